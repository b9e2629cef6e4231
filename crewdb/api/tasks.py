"""crewdb.v1.TaskService: unpacks requests, calls the task queue use cases, packs responses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from crewdb.api import convert
from crewdb.api.middleware import caller
from crewdb.services.tasks import TaskService
from crewdb.v1 import task_service_pb2 as pb
from crewdb.v1 import task_service_pb2_grpc as pb_grpc

Context = Any  # grpc.aio.ServicerContext


class TaskServicer(pb_grpc.TaskServiceServicer):
    def __init__(self, tasks: TaskService) -> None:
        self._tasks = tasks

    async def CreateTask(self, request: pb.CreateTaskRequest, context: Context) -> pb.Task:
        created = await self._tasks.create(
            caller(),
            task_type=request.type,
            priority=request.priority,
            data=convert.optional_struct(request, "data"),
            metadata=convert.optional_struct(request, "metadata"),
            run_after=convert.optional_time(request, "run_after"),
            dedup_key=request.dedup_key,
            max_attempts=request.max_attempts,
        )
        return convert.task(created)

    async def GetTask(self, request: pb.GetTaskRequest, context: Context) -> pb.Task:
        return convert.task(await self._tasks.get(caller(), request.id))

    async def ListTasks(self, request: pb.ListTasksRequest, context: Context) -> pb.ListTasksResponse:
        page = await self._tasks.list_tasks(
            caller(),
            status=convert.task_status_filter(request.status),
            task_type=request.type,
            size=request.page_size,
            token=request.page_token,
        )
        return pb.ListTasksResponse(
            tasks=[convert.task(t) for t in page.items], next_page_token=page.next_page_token
        )

    async def GetQueueStats(self, request: pb.GetQueueStatsRequest, context: Context) -> pb.QueueStats:
        return convert.queue_stats(await self._tasks.stats(caller()))

    async def CancelTask(self, request: pb.CancelTaskRequest, context: Context) -> pb.Task:
        return convert.task(await self._tasks.cancel(caller(), request.id))

    async def WatchTask(
        self, request: pb.WatchTaskRequest, context: Context
    ) -> AsyncIterator[pb.WatchTaskResponse]:
        async for task in self._tasks.watch(caller(), request.id):
            yield pb.WatchTaskResponse(task=convert.task(task))

    async def ClaimTask(self, request: pb.ClaimTaskRequest, context: Context) -> pb.ClaimTaskResponse:
        claimed = await self._tasks.claim(
            request.worker_id, list(request.types), request.lease_seconds, request.wait_seconds
        )
        return pb.ClaimTaskResponse(task=convert.task(claimed)) if claimed else pb.ClaimTaskResponse()

    async def HeartbeatTask(
        self, request: pb.HeartbeatTaskRequest, context: Context
    ) -> pb.HeartbeatTaskResponse:
        task = await self._tasks.heartbeat(
            request.worker_id, request.id, request.progress, request.lease_seconds
        )
        response = pb.HeartbeatTaskResponse(cancel_requested=task.cancel_requested)
        if task.lease_expires_at is not None:
            response.lease_expires_at.CopyFrom(convert.timestamp(task.lease_expires_at))
        return response

    async def CompleteTask(self, request: pb.CompleteTaskRequest, context: Context) -> pb.Task:
        result = convert.optional_struct(request, "result")
        return convert.task(await self._tasks.complete(request.worker_id, request.id, result))

    async def FailTask(self, request: pb.FailTaskRequest, context: Context) -> pb.Task:
        failed = await self._tasks.fail(request.worker_id, request.id, request.error, request.retryable)
        return convert.task(failed)

    async def PurgeTasks(self, request: pb.PurgeTasksRequest, context: Context) -> pb.PurgeTasksResponse:
        older_than = convert.optional_duration(request, "older_than")
        deleted = await self._tasks.purge(convert.task_statuses(request.statuses), older_than)
        return pb.PurgeTasksResponse(deleted=deleted)
