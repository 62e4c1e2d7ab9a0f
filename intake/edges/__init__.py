"""The edges: protocol servers and clients that bring messages in and take mail out."""
