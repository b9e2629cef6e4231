"""crewdb.v1.UserService: unpacks requests, calls the account use cases, packs responses."""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2

from crewdb.api import convert
from crewdb.api.middleware import caller, peer_address
from crewdb.models import TokenPair
from crewdb.services.users import Accounts
from crewdb.v1 import user_service_pb2 as pb
from crewdb.v1 import user_service_pb2_grpc as pb_grpc

Context = Any  # grpc.aio.ServicerContext

TOKEN_TYPE = "Bearer"  # noqa: S105 - the OAuth token type name, not a secret


class UserServicer(pb_grpc.UserServiceServicer):
    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    async def Register(self, request: pb.RegisterRequest, context: Context) -> pb.User:
        created = await self._accounts.register(
            request.email, request.username, request.password, address=peer_address(context)
        )
        return convert.user(created)

    async def Login(self, request: pb.LoginRequest, context: Context) -> pb.LoginResponse:
        pair = await self._accounts.login(request.email_or_username, request.password, peer_address(context))
        return pb.LoginResponse(**_pair_fields(pair))

    async def RefreshToken(
        self, request: pb.RefreshTokenRequest, context: Context
    ) -> pb.RefreshTokenResponse:
        pair = await self._accounts.refresh(request.refresh_token)
        return pb.RefreshTokenResponse(**_pair_fields(pair))

    async def GetMe(self, request: pb.GetMeRequest, context: Context) -> pb.User:
        return convert.user(await self._accounts.me(caller()))

    async def Logout(self, request: pb.LogoutRequest, context: Context) -> empty_pb2.Empty:
        await self._accounts.logout(caller(), request.refresh_token, request.all_sessions)
        return empty_pb2.Empty()

    async def ChangePassword(self, request: pb.ChangePasswordRequest, context: Context) -> empty_pb2.Empty:
        await self._accounts.change_password(
            caller(), request.current_password, request.new_password, peer_address(context)
        )
        return empty_pb2.Empty()

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        sessions = await self._accounts.sessions(caller())
        return pb.ListSessionsResponse(sessions=[convert.session(s) for s in sessions])

    async def RevokeSession(self, request: pb.RevokeSessionRequest, context: Context) -> empty_pb2.Empty:
        await self._accounts.revoke_session(caller(), request.id)
        return empty_pb2.Empty()

    async def ListUsers(self, request: pb.ListUsersRequest, context: Context) -> pb.ListUsersResponse:
        page = await self._accounts.list_users(
            request.page_size,
            request.page_token,
            role=convert.user_role_filter(request.role),
            active=request.active if request.HasField("active") else None,
            query=request.query,
        )
        return pb.ListUsersResponse(
            users=[convert.user(u) for u in page.items], next_page_token=page.next_page_token
        )

    async def GetUser(self, request: pb.GetUserRequest, context: Context) -> pb.User:
        return convert.user(await self._accounts.get_user(request.user_id))

    async def UpdateUserRole(self, request: pb.UpdateUserRoleRequest, context: Context) -> pb.User:
        updated = await self._accounts.set_role(request.user_id, convert.user_role_from_proto(request.role))
        return convert.user(updated)

    async def SetUserActive(self, request: pb.SetUserActiveRequest, context: Context) -> pb.User:
        return convert.user(await self._accounts.set_active(request.user_id, request.active))

    async def GetUserStats(self, request: pb.GetUserStatsRequest, context: Context) -> pb.UserStats:
        return convert.user_stats(await self._accounts.stats())


def _pair_fields(pair: TokenPair) -> dict[str, Any]:
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "expires_in": pair.expires_in,
        "token_type": TOKEN_TYPE,
        "user": convert.user(pair.user),
    }
