"""Storage: the index database (peewee) and the file store.

Imports only ``config`` from this project.
"""
