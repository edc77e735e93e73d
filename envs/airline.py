"""Airline booking: search flights, book, change, cancel, bags, paid from the customer's travel credit."""
from __future__ import annotations

import random

from envs.common import Domain, ask, asked_to_confirm, call, calls, fresh_id, milestone, refuse, say
from k2rl.env import ToolError, tool

CITIES = ["SFO", "JFK", "LAX", "ORD", "SEA", "BOS", "MIA", "DEN", "ATL", "AUS", "LHR", "CDG"]
PEOPLE = ["Ann Lee", "Raj Shah", "Mia Chen", "Tom Ford", "Eva Diaz", "Sam Kim", "Zoe Park", "Leo Rossi"]
BAG_FEE = 30


class Airline(Domain):
    name = "airline"
    system_prompt = ("You are an airline agent. Use the tools to book and manage trips, paid from the customer's "
                     "credit. Ask for missing details and confirm cancellations. Refuse what you cannot do.")

    @tool
    def search(self, origin: str, destination: str, date: str) -> list[dict]:
        """Flights on a route and date (YYYY-MM-DD)."""
        return [{"id": fid, **f} for fid, f in self.state["flights"].items()
                if (f["origin"], f["destination"], f["date"]) == (origin, destination, date)]

    @tool
    def flight(self, flight_id: str) -> dict:
        """Show a flight."""
        return {"id": flight_id, **self.record("flights", flight_id)}

    @tool
    def credit(self) -> int:
        """The customer's travel credit in dollars."""
        return self.state["credit"]

    @tool
    def book(self, flight_id: str, passengers: list[str]) -> dict:
        """Book seats on a flight, one per passenger name."""
        flight = self.record("flights", flight_id)
        if not passengers:
            raise ToolError("at least one passenger is needed")
        if flight["seats"] < len(passengers):
            raise ToolError(f"only {flight['seats']} seats left")
        self._charge(flight["price"] * len(passengers))
        flight["seats"] -= len(passengers)
        rid = self.new_id("R")
        self.state["reservations"][rid] = {"flight": flight_id, "passengers": passengers, "bags": 0,
                                           "status": "booked"}
        return {"id": rid, **self.state["reservations"][rid]}

    @tool
    def reservations(self) -> dict:
        """The customer's reservations."""
        return self.state["reservations"]

    @tool
    def reservation(self, reservation_id: str) -> dict:
        """Show a reservation."""
        return {"id": reservation_id, **self.record("reservations", reservation_id)}

    @tool
    def cancel(self, reservation_id: str) -> dict:
        """Cancel a reservation; the fare goes back to the customer's credit."""
        res = self._booked(reservation_id)
        flight = self.state["flights"][res["flight"]]
        res["status"] = "cancelled"
        flight["seats"] += len(res["passengers"])
        self.state["credit"] += flight["price"] * len(res["passengers"])
        return {"id": reservation_id, **res}

    @tool
    def change(self, reservation_id: str, flight_id: str) -> dict:
        """Move a reservation to another flight on the same route; the fare difference is settled in credit."""
        res, new = self._booked(reservation_id), self.record("flights", flight_id)
        old, n = self.state["flights"][res["flight"]], len(res["passengers"])
        if (old["origin"], old["destination"]) != (new["origin"], new["destination"]):
            raise ToolError("the new flight must be on the same route")
        if new["seats"] < n:
            raise ToolError(f"only {new['seats']} seats left")
        self._charge((new["price"] - old["price"]) * n)
        old["seats"], new["seats"], res["flight"] = old["seats"] + n, new["seats"] - n, flight_id
        return {"id": reservation_id, **res}

    @tool
    def add_bags(self, reservation_id: str, count: int) -> dict:
        """Add checked bags to a reservation ($30 each)."""
        res = self._booked(reservation_id)
        if not 1 <= count <= 5:
            raise ToolError("count must be between 1 and 5")
        self._charge(BAG_FEE * count)
        res["bags"] += count
        return {"id": reservation_id, **res}

    def _booked(self, reservation_id: str) -> dict:
        res = self.record("reservations", reservation_id)
        if res["status"] != "booked":
            raise ToolError(f"reservation {reservation_id} is {res['status']}")
        return res

    def _charge(self, amount: int) -> None:
        if amount > self.state["credit"]:
            raise ToolError(f"not enough credit: {self.state['credit']} available, {amount} needed")
        self.state["credit"] -= amount

    @classmethod
    def world(cls, rng: random.Random) -> dict:
        flights = {}
        for _ in range(8):
            origin, destination = rng.sample(CITIES[:6], 2)
            flights[fresh_id(rng, "F", flights)] = {"origin": origin, "destination": destination,
                                                    "date": f"2026-06-{rng.randint(1, 9):02d}",
                                                    "price": rng.randint(8, 60) * 10, "seats": rng.randint(1, 9)}
        reservations = {}
        for fid in rng.sample(list(flights), 2):
            reservations[fresh_id(rng, "R", reservations, 100, 499)] = {
                "flight": fid, "passengers": [rng.choice(PEOPLE)], "bags": 0, "status": "booked"}
        return {"flights": flights, "reservations": reservations, "credit": rng.randint(0, 20) * 100,
                "next": rng.randint(500, 999)}


def _bookable(rng, state, seats=1):
    """A flight the customer can afford, alone on its route and date (so search has one answer)."""
    key = lambda f: (f["origin"], f["destination"], f["date"])  # noqa: E731
    fid = rng.choice(list(state["flights"]))
    flight = state["flights"][fid]
    for other in [o for o in state["flights"] if o != fid and key(state["flights"][o]) == key(flight)]:
        del state["flights"][other]
    flight["seats"] = max(flight["seats"], seats)
    state["credit"] = max(state["credit"], flight["price"] * seats)
    return fid, flight


def _search(flight):
    return call("search", origin=flight["origin"], destination=flight["destination"], date=flight["date"])


def book(rng, state):
    people = rng.sample(PEOPLE, rng.randint(1, 2))
    fid, f = _bookable(rng, state, len(people))
    rid, cost = f"R{state['next']}", f["price"] * len(people)
    return dict(goal=f"Book a flight from {f['origin']} to {f['destination']} on {f['date']} for {' and '.join(people)}.",
                solution=[calls(_search(f)), calls(call("book", flight_id=fid, passengers=people)),
                          say(f"Booked: reservation {rid} on flight {fid}.")],
                expect={f"reservations.{rid}.flight": fid, "credit": state["credit"] - cost},
                milestones=[milestone("book", flight_id=fid, passengers=people)])


def book_ask(rng, state):
    person = rng.choice(PEOPLE)
    fid, f = _bookable(rng, state)
    rid = f"R{state['next']}"
    return dict(goal=f"I need a flight from {f['origin']} to {f['destination']} for {person}.",
                user_info={"date": f["date"]},
                solution=[ask("date"), calls(_search(f)), calls(call("book", flight_id=fid, passengers=[person])),
                          say(f"Booked: reservation {rid} on flight {fid}.")],
                expect={f"reservations.{rid}.flight": fid, "credit": state["credit"] - f["price"]},
                milestones=[milestone("book", flight_id=fid)], tags=["ask"])


def cancel(rng, state):
    rid = rng.choice(list(state["reservations"]))
    f = state["flights"][state["reservations"][rid]["flight"]]
    confirms = rng.random() < 0.7
    question = say(f"Reservation {rid} will be cancelled and ${f['price']} refunded. Shall I proceed?")
    # Either way the assistant must ask first: a "no" the assistant never asked for is no success.
    common = dict(goal="Please cancel my reservation.", user_info={"reservation id": rid}, user_confirms=confirms,
                  tags=["ask", "confirm" if confirms else "declined"])
    if not confirms:
        return dict(common, solution=[ask("reservation id"), calls(call("reservation", reservation_id=rid)), question,
                                      say(f"OK, reservation {rid} stays booked.")], unchanged=True,
                    milestones=[asked_to_confirm()])
    return dict(common, solution=[ask("reservation id"), calls(call("reservation", reservation_id=rid)), question,
                                  calls(call("cancel", reservation_id=rid)), say(f"Reservation {rid} is cancelled.")],
                expect={f"reservations.{rid}.status": "cancelled", "credit": state["credit"] + f["price"]},
                milestones=[asked_to_confirm(), milestone("cancel", reservation_id=rid)])


def change(rng, state):
    rid = rng.choice(list(state["reservations"]))
    old_id = state["reservations"][rid]["flight"]
    old = state["flights"][old_id]
    new = dict(old, date=f"2026-06-{rng.randint(10, 28):02d}", price=rng.randint(8, 60) * 10, seats=3)
    new_id = fresh_id(rng, "F", state["flights"])
    state["flights"][new_id] = new
    state["credit"] = max(state["credit"], new["price"])
    return dict(goal=f"Please move reservation {rid} to {new['date']}.",
                solution=[calls(call("reservation", reservation_id=rid)), calls(call("flight", flight_id=old_id)),
                          calls(_search(new)), calls(call("change", reservation_id=rid, flight_id=new_id)),
                          say(f"Reservation {rid} is now on flight {new_id} on {new['date']}.")],
                expect={f"reservations.{rid}.flight": new_id, "credit": state["credit"] - new["price"] + old["price"]},
                milestones=[milestone("change", reservation_id=rid, flight_id=new_id)])


def bags(rng, state):
    rid, count = rng.choice(list(state["reservations"])), rng.randint(1, 3)
    state["credit"] = max(state["credit"], BAG_FEE * count)
    return dict(goal=f"Add {count} checked bags to reservation {rid}.",
                solution=[calls(call("add_bags", reservation_id=rid, count=count)),
                          say(f"Added {count} bags to reservation {rid}.")],
                expect={f"reservations.{rid}.bags": count, "credit": state["credit"] - BAG_FEE * count},
                milestones=[milestone("add_bags", reservation_id=rid, count=count)])


def no_route(rng, state):
    served = {(f["origin"], f["destination"]) for f in state["flights"].values()}
    origin, destination = rng.choice([(a, b) for a in CITIES for b in CITIES if a != b and (a, b) not in served])
    date = f"2026-06-{rng.randint(1, 28):02d}"
    return dict(goal=f"Book a flight from {origin} to {destination} on {date} for {rng.choice(PEOPLE)}.",
                **refuse(f"there is no flight from {origin} to {destination} on {date}.",
                         calls(call("search", origin=origin, destination=destination, date=date))))


def no_credit(rng, state):
    fid, f = _bookable(rng, state)
    state["credit"] = rng.randint(0, f["price"] - 1)
    return dict(goal=f"Book a flight from {f['origin']} to {f['destination']} on {f['date']} for {rng.choice(PEOPLE)}.",
                **refuse(f"the fare is ${f['price']} but your credit is only ${state['credit']}.",
                         calls(_search(f), call("credit"))))


Airline.scenarios = (book, book_ask, cancel, change, bags, no_route, no_credit)
