"""Fixed prompt text for the load generator. Never edit these lightly: results
are only comparable between runs that sent the same prompts (the JSON records
a hash of every prompt set).

Our server has no way to ignore end-of-sequence, so the tasks are ones that
make a coding model answer at length (well past 128 tokens) under greedy
decoding; both servers' actual token counts are reported anyway.

Every request gets a distinct prompt: "Request <n>." opens the system message,
so the prompts share no prefix beyond the chat template's first 3 tokens.
llama-server reuses a slot's cached prefix for the next request (our engine
has no prefix cache); a shared system message would let it skip half of a
short prompt, and the comparison would measure that instead of the engines.
Both sides receive exactly the same messages for the same (level, stream, round).
"""

from __future__ import annotations

SYSTEM = "You are a helpful coding assistant."

# With the system message, "Request <n>." and the chat template: ~30 tokens.
SHORT_TASKS = [
    "Write a Python LRU cache with tests.",
    "Implement quicksort in Python, then explain it.",
    "Write a Go HTTP server with logging.",
    "Explain binary search, then implement it.",
    "Write a bash backup script with comments.",
    "Parse CSV into dictionaries in Python.",
    "Explain processes versus threads with examples.",
    "Write a SQL schema for a blog.",
    "Implement a thread-safe queue in Java.",
    "Write a Rust word counter with tests.",
    "Explain Python decorators with examples.",
    "Write a JavaScript debounce function, explained.",
    "Implement Dijkstra's algorithm in Python.",
    "Reverse a linked list in C, explained.",
    "Explain HTTP caching headers with examples.",
    "Write an asyncio web crawler in Python.",
]

LONG_INSTRUCTION = (
    "Review the following Python module. Explain what every class and function does, "
    "point out bugs and risky code, and suggest concrete improvements with code."
)

# A fixed, self-contained module (~1,300 tokens); the load generator keeps
# as many leading lines as fit the long-prompt token target.
LONG_DOCUMENT = '''\
"""Inventory service: stock levels, reservations and reorder planning for a small warehouse."""

import dataclasses
import datetime
import json
import threading
from collections import defaultdict


@dataclasses.dataclass
class Item:
    sku: str
    name: str
    unit_price: float
    quantity: int = 0
    reorder_level: int = 10
    supplier: str = ""


class Reservation:
    def __init__(self, order_id, sku, quantity, expires_at):
        self.order_id = order_id
        self.sku = sku
        self.quantity = quantity
        self.expires_at = expires_at

    def expired(self, now=None):
        now = now or datetime.datetime.now()
        return now > self.expires_at


class Inventory:
    def __init__(self):
        self.items = {}
        self.reservations = []
        self.history = defaultdict(list)
        self.lock = threading.Lock()

    def add_item(self, item):
        if item.sku in self.items:
            raise ValueError("duplicate sku " + item.sku)
        self.items[item.sku] = item
        self.history[item.sku].append(("add", item.quantity, datetime.datetime.now()))

    def receive(self, sku, quantity):
        item = self.items[sku]
        item.quantity += quantity
        self.history[sku].append(("receive", quantity, datetime.datetime.now()))

    def available(self, sku):
        reserved = sum(r.quantity for r in self.reservations if r.sku == sku and not r.expired())
        return self.items[sku].quantity - reserved

    def reserve(self, order_id, sku, quantity, minutes=15):
        if self.available(sku) < quantity:
            return None
        expires = datetime.datetime.now() + datetime.timedelta(minutes=minutes)
        reservation = Reservation(order_id, sku, quantity, expires)
        with self.lock:
            self.reservations.append(reservation)
        return reservation

    def release(self, order_id):
        self.reservations = [r for r in self.reservations if r.order_id != order_id]

    def ship(self, order_id):
        shipped = []
        for reservation in self.reservations:
            if reservation.order_id == order_id:
                item = self.items[reservation.sku]
                item.quantity -= reservation.quantity
                shipped.append((reservation.sku, reservation.quantity))
                self.history[reservation.sku].append(("ship", reservation.quantity, datetime.datetime.now()))
        self.release(order_id)
        return shipped

    def purge_expired(self):
        before = len(self.reservations)
        self.reservations = [r for r in self.reservations if not r.expired()]
        return before - len(self.reservations)

    def value(self):
        total = 0
        for item in self.items.values():
            total = total + item.unit_price * item.quantity
        return round(total, 2)

    def low_stock(self):
        return [item for item in self.items.values() if self.available(item.sku) <= item.reorder_level]


def reorder_plan(inventory, lead_time_days, daily_demand):
    plan = {}
    for item in inventory.low_stock():
        demand = daily_demand.get(item.sku, 0)
        needed = demand * lead_time_days + item.reorder_level - inventory.available(item.sku)
        if needed > 0:
            plan.setdefault(item.supplier, []).append((item.sku, int(needed)))
    return plan


def average_daily_demand(inventory, sku, days=30):
    cutoff = datetime.datetime.now() - datetime.timedelta(days=days)
    shipped = [quantity for kind, quantity, when in inventory.history[sku] if kind == "ship" and when > cutoff]
    return sum(shipped) / days


def save(inventory, path):
    data = {
        "items": [dataclasses.asdict(item) for item in inventory.items.values()],
        "reservations": [
            {"order_id": r.order_id, "sku": r.sku, "quantity": r.quantity, "expires_at": str(r.expires_at)}
            for r in inventory.reservations
        ],
    }
    with open(path, "w") as f:
        json.dump(data, f)


def load(path):
    inventory = Inventory()
    data = json.load(open(path))
    for raw in data["items"]:
        inventory.add_item(Item(**raw))
    for raw in data["reservations"]:
        expires = datetime.datetime.fromisoformat(raw["expires_at"])
        inventory.reservations.append(Reservation(raw["order_id"], raw["sku"], raw["quantity"], expires))
    return inventory


def transfer(source, target, sku, quantity):
    if source.available(sku) < quantity:
        raise ValueError("not enough stock")
    source.items[sku].quantity -= quantity
    if sku not in target.items:
        item = source.items[sku]
        target.add_item(Item(item.sku, item.name, item.unit_price, 0, item.reorder_level, item.supplier))
    target.receive(sku, quantity)


def report(inventory):
    lines = ["SKU        NAME                 QTY   AVAIL  VALUE"]
    for item in sorted(inventory.items.values(), key=lambda i: i.sku):
        value = item.unit_price * item.quantity
        lines.append("%-10s %-20s %5d %6d %8.2f" % (item.sku, item.name[:20], item.quantity,
                                                  inventory.available(item.sku), value))
    lines.append("TOTAL VALUE: %.2f" % inventory.value())
    return "\\n".join(lines)


class PriceBook:
    def __init__(self, discounts=None):
        self.discounts = discounts or {}

    def price(self, item, quantity):
        discount = 0
        for threshold, rate in self.discounts.items():
            if quantity >= threshold:
                discount = rate
        return item.unit_price * quantity * (1 - discount)

    def quote(self, inventory, order):
        total = 0
        for sku, quantity in order.items():
            total += self.price(inventory.items[sku], quantity)
        return total


if __name__ == "__main__":
    inv = Inventory()
    inv.add_item(Item("A-100", "Bolt M6", 0.12, 500, 100, "Acme"))
    inv.add_item(Item("A-200", "Nut M6", 0.05, 80, 100, "Acme"))
    inv.add_item(Item("B-300", "Washer 6mm", 0.02, 1000, 200, "Bolts Ltd"))
    inv.reserve("order-1", "A-100", 50)
    print(report(inv))
    print(reorder_plan(inv, 7, {"A-200": 20}))
'''


def _system(request_number: int) -> dict[str, str]:
    return {"role": "system", "content": f"Request {request_number}. {SYSTEM}"}


def short_messages(request_number: int) -> list[dict[str, str]]:
    task = SHORT_TASKS[(request_number - 1) % len(SHORT_TASKS)]
    return [_system(request_number), {"role": "user", "content": task}]


def long_messages(request_number: int, document_lines: int) -> list[dict[str, str]]:
    document = "\n".join(LONG_DOCUMENT.splitlines()[:document_lines])
    return [_system(request_number), {"role": "user", "content": f"{LONG_INSTRUCTION}\n\n```python\n{document}\n```"}]


def long_document_lines() -> int:
    return len(LONG_DOCUMENT.splitlines())
