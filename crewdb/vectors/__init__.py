"""The knowledge base's vectors: chunking, embedding models, and the ChromaDB store (only here: chromadb)."""
