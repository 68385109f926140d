"""The retriever role: query -> neighbours over HTTP (`service.py`), and the admin path
that appends documents to a memory (`documents.py`). The memory itself, its loading and
the paper's retrieval rules are the `retrieval` library.

Nothing is imported here, so that the gateway can import the service's wire types
without loading FAISS.
"""
