"""The bundle between the two sides: its manifest, the integrity of its files, and their signatures."""
