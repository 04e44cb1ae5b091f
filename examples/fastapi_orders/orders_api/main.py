"""The HTTP side: `uvicorn orders_api.main:api`. An order starts its workflow; its state is polled by id."""
from celery.result import AsyncResult
from fastapi import FastAPI
from pydantic import BaseModel, Field

from orders_api.celery import app
from orders_api.tasks import checkout_workflow

api = FastAPI(title="orders")


class Order(BaseModel):
    order_id: int = Field(ge=1)
    items: int = Field(1, ge=1, le=100)


@api.post("/orders", status_code=202)
def place_order(order: Order) -> dict:
    workflow = checkout_workflow(order.order_id, order.items).apply_async()
    return {"order_id": order.order_id, "workflow_id": workflow.id, "status_url": f"/workflows/{workflow.id}"}


@api.get("/workflows/{workflow_id}")
def workflow_state(workflow_id: str) -> dict:
    result = AsyncResult(workflow_id, app=app)
    return {"id": workflow_id, "state": result.state, "receipt": result.result if result.successful() else None}
