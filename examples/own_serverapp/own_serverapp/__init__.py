"""A Flower app that uses fedmoe as a library: its own ServerApp and ClientApp."""
