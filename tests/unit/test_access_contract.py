"""The protos state who may call every RPC, and only sign-in is open."""

from __future__ import annotations

from crewdb.api.middleware import access_of
from crewdb.v1 import conversation_service_pb2, options_pb2, task_service_pb2, user_service_pb2

SERVICES = [
    conversation_service_pb2.DESCRIPTOR.services_by_name["ConversationService"],
    user_service_pb2.DESCRIPTOR.services_by_name["UserService"],
    task_service_pb2.DESCRIPTOR.services_by_name["TaskService"],
]
PUBLIC = {
    "crewdb.v1.UserService.Register",
    "crewdb.v1.UserService.Login",
    "crewdb.v1.UserService.RefreshToken",
}


def test_every_rpc_declares_its_access_in_the_proto() -> None:
    for service in SERVICES:
        for method in service.methods:
            declared = method.GetOptions().Extensions[options_pb2.access]
            assert declared != options_pb2.ACCESS_UNSPECIFIED, method.full_name


def test_only_registration_sign_in_and_refresh_are_public() -> None:
    public = {m.full_name for s in SERVICES for m in s.methods if access_of(m) == options_pb2.ACCESS_PUBLIC}
    assert public == PUBLIC


def test_account_administration_is_admin_only() -> None:
    users = SERVICES[1]
    admin = {m.name for m in users.methods if access_of(m) == options_pb2.ACCESS_ADMIN}
    assert admin == {"ListUsers", "GetUser", "UpdateUserRole", "SetUserActive", "GetUserStats"}


def test_running_tasks_needs_the_worker_role_and_purging_the_admin_role() -> None:
    tasks = SERVICES[2]
    worker = {m.name for m in tasks.methods if access_of(m) == options_pb2.ACCESS_WORKER}
    admin = {m.name for m in tasks.methods if access_of(m) == options_pb2.ACCESS_ADMIN}
    assert worker == {"ClaimTask", "HeartbeatTask", "CompleteTask", "FailTask"}
    assert admin == {"PurgeTasks"}
