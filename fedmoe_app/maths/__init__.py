"""Torch-free maths of a round: sparse aggregation, bounded influence, differential-privacy noise.

* :mod:`.aggregation` -- each expert over its trainers, the shared part over everyone;
* :mod:`.robust`      -- bounded influence: oversized updates left out, weights capped;
* :mod:`.privacy`     -- DP: clipped deltas, unweighted per-group means, Gaussian noise.
"""
