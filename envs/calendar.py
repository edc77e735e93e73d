"""Calendar and email: events with conflict checks, contacts, inbox, sending mail."""
from __future__ import annotations

import random

from envs.common import Domain, call, calls, fresh_id, milestone, refuse, said, say
from k2rl.env import ToolError, tool

TITLES = ["Dentist", "Team sync", "Lunch with Sam", "Yoga", "Budget review", "Piano lesson", "Interview",
          "Book club", "Haircut", "Sprint demo", "Call with mom", "Gym"]
PEOPLE = ["Ann", "Raj", "Mia", "Tom", "Eva", "Sam", "Zoe", "Leo", "Ivy", "Max"]
SUBJECTS = ["Invoice", "Party", "Trip plans", "Report draft", "Lunch", "Contract", "Photos", "Tickets"]


def _minutes(hhmm: str) -> int:
    hours, _, minutes = hhmm.partition(":")
    if not (hours.isdigit() and minutes.isdigit() and int(hours) < 24 and int(minutes) < 60):
        raise ToolError(f"{hhmm!r} is not a time like 14:30")
    return int(hours) * 60 + int(minutes)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


class Calendar(Domain):
    name = "calendar"
    system_prompt = ("You are a personal assistant managing the user's calendar and email. Use the tools. "
                     "Ask for missing details. Never double-book; refuse what you cannot do.")

    @tool
    def events(self, date: str) -> list[dict]:
        """Events on a date (YYYY-MM-DD)."""
        return [{"id": eid, **e} for eid, e in self.state["events"].items() if e["date"] == date]

    @tool
    def create(self, title: str, date: str, start: str, end: str) -> dict:
        """Create an event (times as HH:MM)."""
        self._free(date, start, end)
        eid = self.new_id("E")
        self.state["events"][eid] = {"title": title, "date": date, "start": start, "end": end, "attendees": []}
        return {"id": eid, **self.state["events"][eid]}

    @tool
    def move(self, event_id: str, date: str, start: str) -> dict:
        """Move an event to a new date and start time, keeping its length."""
        event = self.record("events", event_id)
        end = _hhmm(_minutes(start) + _minutes(event["end"]) - _minutes(event["start"]))
        self._free(date, start, end, ignore=event_id)
        event.update(date=date, start=start, end=end)
        return {"id": event_id, **event}

    @tool
    def delete(self, event_id: str) -> str:
        """Delete an event."""
        self.record("events", event_id)
        del self.state["events"][event_id]
        return f"deleted {event_id}"

    @tool
    def invite(self, event_id: str, email: str) -> dict:
        """Invite someone to an event by email."""
        event = self.record("events", event_id)
        if "@" not in email:
            raise ToolError(f"{email!r} is not an email address")
        event["attendees"].append(email)
        return {"id": event_id, **event}

    @tool
    def contact(self, name: str) -> str:
        """A contact's email address."""
        if name not in self.state["contacts"]:
            raise ToolError(f"no contact named {name}")
        return self.state["contacts"][name]

    @tool
    def inbox(self) -> list[dict]:
        """Received emails (id, sender, subject)."""
        return [{"id": mid, "from": m["from"], "subject": m["subject"]} for mid, m in self.state["inbox"].items()]

    @tool
    def read(self, message_id: str) -> dict:
        """Read one email."""
        return {"id": message_id, **self.record("inbox", message_id)}

    @tool
    def send(self, to: str, subject: str, body: str) -> str:
        """Send an email."""
        if "@" not in to:
            raise ToolError(f"{to!r} is not an email address")
        self.state["sent"].append({"to": to, "subject": subject, "body": body})
        return "sent"

    def _free(self, date: str, start: str, end: str, ignore: str | None = None) -> None:
        lo, hi = _minutes(start), _minutes(end)
        if hi <= lo:
            raise ToolError("the end must be after the start")
        for eid, e in self.state["events"].items():
            if eid != ignore and e["date"] == date and lo < _minutes(e["end"]) and _minutes(e["start"]) < hi:
                raise ToolError(f"conflicts with {e['title']} ({e['start']}-{e['end']})")

    @classmethod
    def world(cls, rng: random.Random) -> dict:
        slots = rng.sample([(day, hour) for day in range(1, 10) for hour in range(8, 18)], 4)  # no conflicts
        events = {}
        for title, (day, hour) in zip(rng.sample(TITLES, 4), slots):
            events[fresh_id(rng, "E", events, 100, 499)] = {"title": title, "date": f"2026-03-{day:02d}",
                                                           "start": _hhmm(hour * 60), "end": _hhmm(hour * 60 + 60),
                                                           "attendees": []}
        contacts = {name: f"{name.lower()}@mail.com" for name in rng.sample(PEOPLE, 5)}
        inbox = {fresh_id(rng, "M", (), 100, 999): {"from": email, "subject": rng.choice(SUBJECTS),
                                                    "body": f"Hi, see you at {rng.randint(1, 9)} pm."}
                 for email in rng.sample(list(contacts.values()), 2)}
        return {"events": events, "contacts": contacts, "inbox": inbox, "sent": [], "next": rng.randint(500, 999)}


def _event(rng, state):
    eid = rng.choice(list(state["events"]))
    return eid, state["events"][eid]


def _free_slot(rng, state, date):
    busy = {e["start"] for e in state["events"].values() if e["date"] == date}
    return _hhmm(rng.choice([h * 60 for h in range(8, 20) if _hhmm(h * 60) not in busy and _hhmm(h * 60 - 60) not in busy
                             and _hhmm(h * 60 + 60) not in busy]))


def create(rng, state):
    title, date = rng.choice(TITLES), f"2026-03-{rng.randint(1, 12):02d}"
    start = _free_slot(rng, state, date)
    end, eid = _hhmm(_minutes(start) + 60), f"E{state['next']}"
    return dict(goal=f"Put '{title}' on my calendar on {date} from {start} to {end}.",
                solution=[calls(call("create", title=title, date=date, start=start, end=end)),
                          say(f"Added {title} on {date} at {start}.")],
                expect={f"events.{eid}": {"title": title, "date": date, "start": start, "end": end, "attendees": []}},
                milestones=[milestone("create", date=date, start=start, end=end)])


def create_ask(rng, state):
    title, date = rng.choice(TITLES), f"2026-03-{rng.randint(1, 12):02d}"
    start = _free_slot(rng, state, date)
    end, eid = _hhmm(_minutes(start) + 60), f"E{state['next']}"
    return dict(goal=f"Schedule '{title}' on {date}.", user_info={"start time": start, "end time": end},
                solution=[say("Sure. What start time and end time?"),
                          calls(call("create", title=title, date=date, start=start, end=end)),
                          say(f"Added {title} on {date} at {start}.")],
                expect={f"events.{eid}.start": start, f"events.{eid}.end": end, f"events.{eid}.date": date},
                milestones=[milestone("create", date=date, start=start, end=end)], tags=["ask"])


def move(rng, state):
    eid, e = _event(rng, state)
    date = f"2026-03-{rng.randint(10, 28):02d}"
    start = _free_slot(rng, state, date)
    return dict(goal=f"Move my {e['title']} on {e['date']} to {date} at {start}.",
                solution=[calls(call("events", date=e["date"])), calls(call("move", event_id=eid, date=date, start=start)),
                          say(f"Moved {e['title']} to {date} at {start}.")],
                expect={f"events.{eid}.date": date, f"events.{eid}.start": start,
                        f"events.{eid}.end": _hhmm(_minutes(start) + 60)},
                milestones=[milestone("move", event_id=eid, date=date, start=start)])


def delete(rng, state):
    eid, e = _event(rng, state)
    return dict(goal=f"Delete my {e['title']} event.", user_info={"date": e["date"]},
                solution=[say("Sure. On which date is it?"), calls(call("events", date=e["date"])),
                          calls(call("delete", event_id=eid)), say(f"Deleted {e['title']}.")],
                expect={f"events.{eid}": None}, milestones=[milestone("delete", event_id=eid)], tags=["ask"])


def email(rng, state):
    name = rng.choice(list(state["contacts"]))
    topic = rng.choice(SUBJECTS)
    return dict(goal=f"Email {name} about the {topic.lower()}: tell them it is ready.",
                solution=[calls(call("contact", name=name)),
                          calls(call("send", to=state["contacts"][name], subject=topic, body=f"Hi {name}, the {topic.lower()} is ready.")),
                          say(f"Sent the email to {name}.")],
                expect={"sent.0.to": state["contacts"][name]}, milestones=[milestone("send", to=state["contacts"][name])])


def invite(rng, state):
    eid, e = _event(rng, state)
    name = rng.choice(list(state["contacts"]))
    address = state["contacts"][name]
    return dict(goal=f"Invite {name} to my {e['title']} on {e['date']}.",
                solution=[calls(call("contact", name=name), call("events", date=e["date"])),
                          calls(call("invite", event_id=eid, email=address)), say(f"Invited {name} to {e['title']}.")],
                expect={f"events.{eid}.attendees": [address]}, milestones=[milestone("invite", event_id=eid, email=address)])


def latest_mail(rng, state):
    mid = rng.choice(list(state["inbox"]))
    mail = state["inbox"][mid]
    name = next(n for n, a in state["contacts"].items() if a == mail["from"])
    return dict(goal=f"What did {name} write to me?",
                solution=[calls(call("inbox")), calls(call("read", message_id=mid)),
                          say(f"{name} wrote about {mail['subject']}: {mail['body']}")],
                unchanged=True, milestones=[milestone("read", message_id=mid), said(mail["subject"])])


def conflict(rng, state):
    eid, e = _event(rng, state)
    title = rng.choice([t for t in TITLES if t != e["title"]])
    return dict(goal=f"Add '{title}' on {e['date']} from {e['start']} to {e['end']}.",
                **refuse(f"you already have {e['title']} then.", calls(call("events", date=e["date"]))))


def stranger(rng, state):
    name = rng.choice([p for p in PEOPLE if p not in state["contacts"]])
    return dict(goal=f"Email {name} that I will be late.",
                **refuse(f"{name} is not in your contacts.", calls(call("contact", name=name))))


Calendar.scenarios = (create, create_ask, move, delete, email, invite, latest_mail, conflict, stranger)
