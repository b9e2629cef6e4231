"""crewdb.v1.ConversationService: unpacks requests, calls the use cases, packs responses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import empty_pb2

from crewdb.api import convert
from crewdb.api.middleware import caller
from crewdb.services.conversations import ConversationService
from crewdb.v1 import conversation_service_pb2 as pb
from crewdb.v1 import conversation_service_pb2_grpc as pb_grpc

Context = Any  # grpc.aio.ServicerContext; unused by the handlers, which never abort themselves


class ConversationServicer(pb_grpc.ConversationServiceServicer):
    def __init__(self, conversations: ConversationService) -> None:
        self._conversations = conversations

    async def CreateConversation(
        self, request: pb.CreateConversationRequest, context: Context
    ) -> pb.Conversation:
        created = await self._conversations.create_conversation(caller(), request.title)
        return convert.conversation(created)

    async def GetConversation(self, request: pb.GetConversationRequest, context: Context) -> pb.Conversation:
        return convert.conversation(await self._conversations.get_conversation(caller(), request.id))

    async def ListConversations(
        self, request: pb.ListConversationsRequest, context: Context
    ) -> pb.ListConversationsResponse:
        page = await self._conversations.list_conversations(
            caller(), request.page_size, request.page_token, all_users=request.all_users
        )
        return pb.ListConversationsResponse(
            conversations=[convert.conversation(c) for c in page.items],
            next_page_token=page.next_page_token,
        )

    async def UpdateConversationTitle(
        self, request: pb.UpdateConversationTitleRequest, context: Context
    ) -> pb.Conversation:
        updated = await self._conversations.update_title(caller(), request.id, request.title)
        return convert.conversation(updated)

    async def DeleteConversation(
        self, request: pb.DeleteConversationRequest, context: Context
    ) -> empty_pb2.Empty:
        await self._conversations.delete_conversation(caller(), request.id)
        return empty_pb2.Empty()

    async def AddMessage(self, request: pb.AddMessageRequest, context: Context) -> pb.Message:
        metadata = convert.struct_to_dict(request.metadata) if request.HasField("metadata") else None
        added = await self._conversations.add_message(
            caller(),
            request.conversation_id,
            convert.role_from_proto(request.role),
            request.content,
            metadata,
        )
        return convert.message(added)

    async def ListMessages(
        self, request: pb.ListMessagesRequest, context: Context
    ) -> pb.ListMessagesResponse:
        page = await self._conversations.list_messages(
            caller(), request.conversation_id, request.page_size, request.page_token
        )
        return pb.ListMessagesResponse(
            messages=[convert.message(m) for m in page.items],
            next_page_token=page.next_page_token,
        )

    async def SearchConversations(
        self, request: pb.SearchConversationsRequest, context: Context
    ) -> pb.SearchConversationsResponse:
        hits = await self._conversations.search(
            caller(), request.query, request.page_size, all_users=request.all_users
        )
        return pb.SearchConversationsResponse(results=[convert.search_result(h) for h in hits])

    async def GetConversationStats(
        self, request: pb.GetConversationStatsRequest, context: Context
    ) -> pb.ConversationStats:
        return convert.stats(await self._conversations.stats(caller(), all_users=request.all_users))

    async def ExportConversation(
        self, request: pb.ExportConversationRequest, context: Context
    ) -> pb.ExportConversationResponse:
        export_format = convert.export_format_from_proto(request.format)
        document = await self._conversations.export(caller(), request.id, export_format)
        return convert.export(document)

    async def WatchMessages(
        self, request: pb.WatchMessagesRequest, context: Context
    ) -> AsyncIterator[pb.WatchMessagesResponse]:
        async for added in self._conversations.watch(
            caller(), request.conversation_id, request.after_message_id
        ):
            yield pb.WatchMessagesResponse(message=convert.message(added))
