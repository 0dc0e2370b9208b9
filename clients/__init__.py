"""Flower client side: ClientApp builders and the local trainer."""
