"""What travels between server and clients: record keys, payload slicing by (layer, expert), reply checks.

* :mod:`.records`  -- Flower ``ArrayRecord`` packing and wire bytes;
* :mod:`.holdings` -- which experts of which MoE layer a message holds, and its payload;
* :mod:`.protocol` -- record keys, what each node was sent, reply validation.

Torch-free (checked by an import contract): both sides import it, neither through it the other.
"""
