"""Online shop: search, cart, checkout, order status, cancel, return.

Built small on purpose: short tool names, one or two arguments and dialogs of a few hundred tokens,
so a tiny model can learn it from oracle dialogs (the CPU demo SFTs k2-tiny here, then runs RL).
"""
from __future__ import annotations

import random

from envs.common import Domain, ask, call, calls, fresh_id, milestone, refuse, said, say
from k2rl.env import ToolError, tool

NAMES = ["mug", "lamp", "pen", "desk", "chair", "sofa", "rug", "kettle", "clock", "vase", "towel", "pillow",
         "plate", "bowl", "spoon", "fork", "knife", "cup", "jar", "bag", "hat", "scarf", "sock", "shoe", "belt",
         "book", "map", "kite", "ball", "radio", "fan", "bike", "tent", "rope", "soap", "brush", "comb", "box"]


class Shop(Domain):
    name = "shop"
    system_prompt = "You are a shop assistant. Use the tools. Ask for what you need. Refuse what you cannot do."

    @tool
    def find(self, q: str) -> list[dict]:
        """Search items by name."""
        return [{"sku": sku, **item} for sku, item in self.state["items"].items() if q.lower() in item["name"]]

    @tool
    def item(self, sku: str) -> dict:
        """Show an item."""
        return {"sku": sku, **self._item(sku)}

    @tool
    def cart(self) -> dict:
        """Show the cart (sku -> qty)."""
        return self.state["cart"]

    @tool
    def add(self, sku: str, qty: int = 1) -> dict:
        """Add an item to the cart."""
        item = self._item(sku)
        if qty < 1:
            raise ToolError("qty must be at least 1")
        if item["stock"] < self.state["cart"].get(sku, 0) + qty:
            raise ToolError(f"only {item['stock']} {item['name']} in stock")
        self.state["cart"][sku] = self.state["cart"].get(sku, 0) + qty
        return self.state["cart"]

    @tool
    def drop(self, sku: str) -> dict:
        """Remove an item from the cart."""
        if self.state["cart"].pop(sku, None) is None:
            raise ToolError(f"{sku} is not in the cart")
        return self.state["cart"]

    @tool
    def buy(self) -> dict:
        """Order everything in the cart."""
        cart = self.state["cart"]
        if not cart:
            raise ToolError("the cart is empty")
        oid = self.new_id("O")
        for sku, qty in cart.items():
            self.state["items"][sku]["stock"] -= qty
        total = sum(self.state["items"][sku]["price"] * qty for sku, qty in cart.items())
        self.state["orders"][oid] = {"items": dict(cart), "total": total, "status": "placed"}
        self.state["cart"] = {}
        return {"id": oid, **self.state["orders"][oid]}

    @tool
    def order(self, id: str) -> dict:
        """Show an order."""
        return {"id": id, **self._order(id)}

    @tool
    def cancel(self, id: str) -> dict:
        """Cancel an order that has not shipped yet."""
        order = self._order(id)
        if order["status"] != "placed":
            raise ToolError(f"order {id} is {order['status']}; only placed orders can be cancelled")
        order["status"] = "cancelled"
        for sku, qty in order["items"].items():
            self.state["items"][sku]["stock"] += qty
        return {"id": id, **order}

    @tool
    def refund(self, id: str) -> dict:
        """Return a delivered order for a refund."""
        order = self._order(id)
        if order["status"] != "delivered":
            raise ToolError(f"order {id} is {order['status']}; only delivered orders can be returned")
        order["status"] = "returned"
        return {"id": id, **order}

    def _item(self, sku: str) -> dict:
        return self.record("items", sku)

    def _order(self, id: str) -> dict:
        return self.record("orders", id)

    @classmethod
    def world(cls, rng: random.Random) -> dict:
        items = {}
        for name in rng.sample(NAMES, 6):
            items[fresh_id(rng, "P", items, 10, 99)] = {"name": name, "price": rng.randint(2, 60),
                                                        "stock": rng.randint(1, 5)}
        orders = {}
        for _ in range(3):
            sku = rng.choice(list(items))
            qty = rng.randint(1, 3)
            orders[fresh_id(rng, "O", orders, 100, 499)] = {
                "items": {sku: qty}, "total": items[sku]["price"] * qty,
                "status": rng.choice(["placed", "shipped", "delivered"])}
        return {"items": items, "cart": {}, "orders": orders, "next": rng.randint(500, 999)}


def _in_stock(rng, state, qty=1):
    return rng.choice([sku for sku, item in state["items"].items() if item["stock"] >= qty])


def _with_status(rng, state, status):
    oid = rng.choice(list(state["orders"]))
    state["orders"][oid]["status"] = status
    return oid, state["orders"][oid]


def buy_one(rng, state):
    qty = rng.randint(1, 2)
    sku = _in_stock(rng, state, qty)
    item, oid = state["items"][sku], f"O{state['next']}"
    return dict(goal=f"I want to buy {qty} {item['name']}.",
                solution=[calls(call("find", q=item["name"])), calls(call("add", sku=sku, qty=qty), call("buy")),
                          say(f"Done. Your order is {oid}.")],
                expect={f"orders.{oid}.items.{sku}": qty, f"items.{sku}.stock": item["stock"] - qty, "cart": {}},
                milestones=[milestone("add", sku=sku, qty=qty), milestone("buy")])


def buy_two(rng, state):
    a, b = rng.sample(list(state["items"]), 2)
    na, nb, oid = state["items"][a]["name"], state["items"][b]["name"], f"O{state['next']}"
    return dict(goal=f"Please order one {na} and one {nb}.",
                solution=[calls(call("find", q=na), call("find", q=nb)),
                          calls(call("add", sku=a, qty=1), call("add", sku=b, qty=1), call("buy")),
                          say(f"Done. Your order is {oid}.")],
                expect={f"orders.{oid}.items": {a: 1, b: 1}, "cart": {}},
                milestones=[milestone("add", sku=a), milestone("add", sku=b), milestone("buy")])


def status(rng, state):
    oid = rng.choice(list(state["orders"]))
    st = state["orders"][oid]["status"]
    return dict(goal=f"What is the status of order {oid}?",
                solution=[calls(call("order", id=oid)), say(f"Order {oid} is {st}.")],
                unchanged=True, milestones=[milestone("order", id=oid), said(st)])


def cancel(rng, state):
    oid, order = _with_status(rng, state, "placed")
    return dict(goal=f"Please cancel order {oid}.",
                solution=[calls(call("cancel", id=oid)), say(f"Order {oid} is cancelled.")],
                expect=_cancelled(state, oid, order), milestones=[milestone("cancel", id=oid)])


def cancel_ask(rng, state):
    oid, order = _with_status(rng, state, "placed")
    return dict(goal="Please cancel my order.", user_info={"order id": oid},
                solution=[ask("order id"), calls(call("cancel", id=oid)), say(f"Order {oid} is cancelled.")],
                expect=_cancelled(state, oid, order), milestones=[milestone("cancel", id=oid)], tags=["ask"])


def _cancelled(state, oid, order):
    (sku, qty), = order["items"].items()
    return {f"orders.{oid}.status": "cancelled", f"items.{sku}.stock": state["items"][sku]["stock"] + qty}


def cancel_shipped(rng, state):
    """Worded as `cancel`, so the user's words cannot tell the two apart: the reference tries `cancel`
    as there, and declines on what the tool answers (only placed orders cancel; nothing changes). A
    look-up first here but not there would teach two procedures for one request."""
    st = rng.choice(["shipped", "delivered"])
    oid, _ = _with_status(rng, state, st)
    return dict(goal=f"Please cancel order {oid}.",
                **refuse(f"order {oid} is {st}, so it can't be cancelled.", calls(call("cancel", id=oid))))


def refund(rng, state):
    oid, _ = _with_status(rng, state, "delivered")
    return dict(goal=f"I want to return order {oid}.",
                solution=[calls(call("refund", id=oid)), say(f"Order {oid} is returned.")],
                expect={f"orders.{oid}.status": "returned"}, milestones=[milestone("refund", id=oid)])


def drop(rng, state):
    sku = rng.choice(list(state["items"]))
    state["cart"] = {sku: 1}
    return dict(goal=f"Remove the {state['items'][sku]['name']} from my cart.",
                solution=[calls(call("cart")), calls(call("drop", sku=sku)), say("Done. Your cart is empty.")],
                expect={"cart": {}}, milestones=[milestone("drop", sku=sku)])


def sold_out(rng, state):
    sku = rng.choice(list(state["items"]))
    item = state["items"][sku]
    item["stock"] = 0
    return dict(goal=f"I want to buy a {item['name']}.",
                **refuse(f"the {item['name']} is sold out.", calls(call("find", q=item["name"]))))


Shop.scenarios = (buy_one, buy_two, status, cancel, cancel_ask, cancel_shipped, refund, drop, sold_out)
