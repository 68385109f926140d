"""The retriever: a versioned, memory-mapped memory (`memory.py`: FAISS index + document
store, verified at load, swapped atomically) and the paper's retrieval rules over it
(`search.py`). The service that exposes them over HTTP is `service.py`.

Nothing is imported here, so that the gateway can import the service's wire types
without loading FAISS.
"""
