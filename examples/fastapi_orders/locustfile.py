"""Customers of orders_api, written against loadlab's public API (loadlab.loadtests.api):

    loadlab run --app orders_api.celery:app --locustfile locustfile.py --duration 15s

Each publish is counted in the run's ledger and report; Locust's statistics get a `publish <task>` request per
publish and an `end_to_end <task>` request per finished task."""
import random

from locust import between, task

from loadlab.loadtests.api import CeleryUser


class Customer(CeleryUser):
    wait_time = between(0.05, 0.15)

    @task(3)
    def check_out(self):
        self.publish("orders_api.tasks.checkout", kwargs={"order_id": random.randint(1, 100_000),
                                                          "items": random.randint(1, 4)})

    @task(2)
    def pay_a_saved_basket(self):
        reservation = {"order_id": random.randint(1, 100_000), "amount_cents": random.randint(100, 9000)}
        # a payment nobody waits for after a minute is dropped rather than charged late
        self.publish("orders_api.tasks.charge_payment", args=(reservation,), expires=60)

    @task(1)
    def reserve_later(self):
        self.publish("orders_api.tasks.reserve_stock", args=(random.randint(1, 100_000),), countdown=0.5,
                     priority=3)
