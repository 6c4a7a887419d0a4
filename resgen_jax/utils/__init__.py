"""Small helpers shared by every stage (images, files)."""
