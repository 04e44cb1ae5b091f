import time

from celery import shared_task


@shared_task
def send_confirmation(order_id: int, to: str) -> str:
    """Stands in for an SMTP round trip; routed to the "emails" queue (CELERY_TASK_ROUTES)."""
    time.sleep(0.01)
    return f"order {order_id} confirmed to {to}"
