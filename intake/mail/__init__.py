"""Mail as data: parsing, charsets, classification, reply text. Pure: bytes in, facts out."""
