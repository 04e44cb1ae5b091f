import hashlib

from celery import shared_task


@shared_task
def charge_invoice(invoice_id: int, amount_cents: int, currency: str = "EUR") -> dict:
    """Stands in for signing a payment request (CPU work); routed to the "billing" queue (CELERY_TASK_ROUTES)."""
    digest = f"{invoice_id}:{amount_cents}:{currency}".encode()
    for _ in range(2000):
        digest = hashlib.sha256(digest).digest()
    return {"invoice_id": invoice_id, "charged_cents": amount_cents, "reference": digest.hex()[:16]}
