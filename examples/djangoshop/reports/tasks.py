from celery import shared_task


@shared_task
def daily_sales(day: str, shop: str = "main") -> dict:
    """The project's own reporting task, in its own reports app."""
    return {"day": day, "shop": shop, "orders": sum(ord(c) for c in day + shop) % 500}
