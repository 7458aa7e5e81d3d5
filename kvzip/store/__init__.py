"""RAG pre-cache store: passage artifacts, SQLite index and retrieval."""
