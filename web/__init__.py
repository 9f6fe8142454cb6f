"""The HTTP edge: the aiohttp application. Imports ``iepnode``; never ``scp``."""
