"""crewdb.v1.VectorService: unpacks requests, calls the knowledge base use cases, packs responses."""

from __future__ import annotations

from typing import Any

from crewdb.api import convert
from crewdb.api.middleware import caller
from crewdb.models import NewDocument
from crewdb.services.knowledge import KnowledgeBase
from crewdb.v1 import vector_service_pb2 as pb
from crewdb.v1 import vector_service_pb2_grpc as pb_grpc

Context = Any  # grpc.aio.ServicerContext


class VectorServicer(pb_grpc.VectorServiceServicer):
    def __init__(self, knowledge: KnowledgeBase) -> None:
        self._knowledge = knowledge

    async def AddDocuments(
        self, request: pb.AddDocumentsRequest, context: Context
    ) -> pb.AddDocumentsResponse:
        documents = [
            NewDocument(
                id=doc.id,
                text=doc.text,
                title=doc.title,
                metadata=convert.struct_to_dict(doc.metadata, f"documents[{i}].metadata"),
            )
            for i, doc in enumerate(request.documents)
        ]
        added = await self._knowledge.add(caller(), documents)
        return pb.AddDocumentsResponse(
            documents=[
                pb.AddedDocument(id=a.id, chunk_count=a.chunk_count, replaced=a.replaced) for a in added
            ]
        )

    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        hits = await self._knowledge.search(
            caller(),
            request.query,
            top_k=request.top_k,
            filter_=convert.struct_to_dict(request.filter, "filter"),
            min_score=request.min_score,
            mode=convert.search_mode(request.mode),
        )
        return pb.SearchResponse(results=[convert.chunk_hit(hit) for hit in hits])

    async def GetDocument(self, request: pb.GetDocumentRequest, context: Context) -> pb.Document:
        return convert.document(await self._knowledge.get(caller(), request.id))

    async def ListDocuments(
        self, request: pb.ListDocumentsRequest, context: Context
    ) -> pb.ListDocumentsResponse:
        page = await self._knowledge.list_documents(caller(), request.page_size, request.page_token)
        return pb.ListDocumentsResponse(
            documents=[convert.document(d) for d in page.items], next_page_token=page.next_page_token
        )

    async def DeleteDocuments(
        self, request: pb.DeleteDocumentsRequest, context: Context
    ) -> pb.DeleteDocumentsResponse:
        deleted = await self._knowledge.delete(
            caller(), list(request.ids), convert.struct_to_dict(request.filter, "filter")
        )
        return pb.DeleteDocumentsResponse(deleted_count=len(deleted), deleted_ids=deleted)

    async def GetVectorStats(self, request: pb.GetVectorStatsRequest, context: Context) -> pb.VectorStats:
        stats = await self._knowledge.stats(caller())
        return pb.VectorStats(
            documents=stats.documents,
            chunks=stats.chunks,
            embedding_model=stats.embedding_model,
            dimension=stats.dimension,
            collection=stats.collection,
            distance=stats.distance,
            chunk_size=stats.chunk_size,
            chunk_overlap=stats.chunk_overlap,
        )
