"""The network, its training and what is stored with its weights."""
