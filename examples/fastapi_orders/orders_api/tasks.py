"""An order's workflow: reserve the stock, charge the payment (retried while the gateway is busy), send the
receipt; each step is fed the previous step's result (a Celery chain)."""
import time

from celery import chain

from orders_api.celery import app


class GatewayBusy(Exception):
    """The payment gateway asked to be called again later (its 429 or 503)."""


@app.task
def reserve_stock(order_id: int, items: int = 1) -> dict:
    time.sleep(0.002 * items)  # stands in for the stock service's round trip
    return {"order_id": order_id, "amount_cents": 1250 * items}


@app.task(bind=True, autoretry_for=(GatewayBusy,), retry_backoff=1, retry_backoff_max=4, retry_jitter=True,
          max_retries=5)
def charge_payment(self, reservation: dict) -> dict:
    # The gateway is busy for an order's first (order_id % 3) calls: a third of orders go through at once, the
    # rest after one or two retries, the same way on every run.
    if self.request.retries < reservation["order_id"] % 3:
        raise GatewayBusy(f"gateway busy for order {reservation['order_id']}")
    return {**reservation, "paid": True}


@app.task
def send_receipt(payment: dict) -> str:
    time.sleep(0.005)  # stands in for the mail provider's API call
    return f"receipt for order {payment['order_id']}: {payment['amount_cents'] / 100:.2f} EUR"


def checkout_workflow(order_id: int, items: int = 1):
    """The order's workflow as a chain signature: reserve -> charge -> receipt."""
    return chain(reserve_stock.s(order_id, items), charge_payment.s(), send_receipt.s())


@app.task
def checkout(order_id: int, items: int = 1) -> str:
    """Starts the order's workflow from a worker (a queued checkout, e.g. from a basket that was saved); returns
    the id of the workflow's last task."""
    return checkout_workflow(order_id, items).apply_async().id
