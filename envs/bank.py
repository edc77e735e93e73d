"""Banking and payments: accounts, transfers, payees, cards, disputes."""
from __future__ import annotations

import random

from envs.common import Domain, ask, call, calls, fresh_id, milestone, refuse, said, say
from k2rl.env import ToolError, tool

PAYEES = ["Alice Moss", "Bob Reed", "City Power", "Water Co", "Gym Plus", "Dr Patel", "Rent Ltd", "Net Fast"]
MERCHANTS = ["Coffee Hub", "Fuel Stop", "Book Nook", "Mega Mart", "Taxi Go", "Pizza Place", "Shoe Box", "Game Zone"]


class Bank(Domain):
    name = "bank"
    system_prompt = ("You are a bank assistant. Use the tools to serve the customer. Ask for missing details. "
                     "Never overdraw an account; refuse what you cannot do.")

    @tool
    def accounts(self) -> dict:
        """List the customer's accounts with type and balance."""
        return self.state["accounts"]

    @tool
    def history(self, account: str) -> list[dict]:
        """Recent transactions of an account."""
        self.record("accounts", account)
        return [{"id": tid, **t} for tid, t in self.state["txns"].items() if t["account"] == account]

    @tool
    def transfer(self, source: str, target: str, amount: int) -> dict:
        """Move money between two of the customer's accounts."""
        self._debit(source, amount, f"transfer to {target}")
        self.record("accounts", target)["balance"] += amount
        return {"source": self.state["accounts"][source], "target": self.state["accounts"][target]}

    @tool
    def payees(self) -> dict:
        """Saved payees (name -> IBAN)."""
        return self.state["payees"]

    @tool
    def add_payee(self, name: str, iban: str) -> dict:
        """Save a new payee."""
        if not (iban[:2].isalpha() and iban[2:].isdigit() and len(iban) >= 8):
            raise ToolError(f"{iban!r} is not a valid IBAN")
        self.state["payees"][name] = iban
        return self.state["payees"]

    @tool
    def pay(self, account: str, payee: str, amount: int) -> dict:
        """Pay a saved payee from an account."""
        self.record("payees", payee)
        return self._debit(account, amount, payee)

    @tool
    def cards(self) -> dict:
        """List the customer's cards."""
        return self.state["cards"]

    @tool
    def freeze(self, card: str) -> dict:
        """Freeze a card (lost or stolen)."""
        self.record("cards", card)["status"] = "frozen"
        return self.state["cards"][card]

    @tool
    def set_limit(self, card: str, limit: int) -> dict:
        """Set a card's monthly spending limit."""
        if not 0 < limit <= 10000:
            raise ToolError("limit must be between 1 and 10000")
        self.record("cards", card)["limit"] = limit
        return self.state["cards"][card]

    @tool
    def dispute(self, txn: str) -> dict:
        """Dispute a card transaction the customer did not make."""
        self.record("txns", txn)["disputed"] = True
        return self.state["txns"][txn]

    def _debit(self, account: str, amount: int, memo: str) -> dict:
        acct = self.record("accounts", account)
        if amount <= 0:
            raise ToolError("amount must be positive")
        if acct["balance"] < amount:
            raise ToolError(f"insufficient funds: balance is {acct['balance']}")
        acct["balance"] -= amount
        self.state["txns"][self.new_id("T")] = {"account": account, "amount": -amount, "merchant": memo,
                                                "disputed": False}
        return acct

    @classmethod
    def world(cls, rng: random.Random) -> dict:
        chk, sav = fresh_id(rng, "A", ()), fresh_id(rng, "S", ())
        accounts = {chk: {"type": "checking", "balance": rng.randint(50, 3000)},
                    sav: {"type": "savings", "balance": rng.randint(100, 9000)}}
        payees = {name: f"DE{rng.randint(10**9, 10**10 - 1)}" for name in rng.sample(PAYEES, 3)}
        cards = {fresh_id(rng, "C", (), 1000, 9999): {"account": acct, "status": "active", "limit": 1000}
                 for acct in (chk, sav)}
        txns = {}
        for merchant in rng.sample(MERCHANTS, 3):
            txns[fresh_id(rng, "T", txns, 100, 499)] = {"account": chk, "amount": -rng.randint(3, 200),
                                                       "merchant": merchant, "disputed": False}
        return {"accounts": accounts, "payees": payees, "cards": cards, "txns": txns, "next": rng.randint(500, 999)}


def _acct(state, kind):
    return next(a for a, v in state["accounts"].items() if v["type"] == kind)


def transfer(rng, state):
    source_kind, target_kind = rng.choice([("checking", "savings"), ("savings", "checking")])
    source, target = _acct(state, source_kind), _acct(state, target_kind)
    amount = rng.randint(1, state["accounts"][source]["balance"])
    return dict(goal=f"Move ${amount} from my {source_kind} to my {target_kind} account.",
                solution=[calls(call("accounts")), calls(call("transfer", source=source, target=target, amount=amount)),
                          say(f"Done. ${amount} moved to your {target_kind} account.")],
                expect={f"accounts.{source}.balance": state["accounts"][source]["balance"] - amount,
                        f"accounts.{target}.balance": state["accounts"][target]["balance"] + amount},
                milestones=[milestone("transfer", source=source, target=target, amount=amount)])


def pay_ask(rng, state):
    chk, payee = _acct(state, "checking"), rng.choice(list(state["payees"]))
    amount = rng.randint(1, state["accounts"][chk]["balance"])
    return dict(goal=f"Please pay {payee} from my checking account.", user_info={"amount": str(amount)},
                solution=[ask("amount"), calls(call("accounts")),
                          calls(call("pay", account=chk, payee=payee, amount=amount)),
                          say(f"Done. You paid ${amount} to {payee}.")],
                expect={f"accounts.{chk}.balance": state["accounts"][chk]["balance"] - amount},
                milestones=[milestone("pay", account=chk, payee=payee, amount=amount)], tags=["ask"])


def new_payee(rng, state):
    chk = _acct(state, "checking")
    name = rng.choice([p for p in PAYEES if p not in state["payees"]])
    iban, amount = f"FR{rng.randint(10**9, 10**10 - 1)}", rng.randint(1, state["accounts"][chk]["balance"])
    return dict(goal=f"Add {name} (IBAN {iban}) as a payee and send them ${amount} from checking.",
                solution=[calls(call("accounts")),
                          calls(call("add_payee", name=name, iban=iban),
                                call("pay", account=chk, payee=name, amount=amount)),
                          say(f"Done. {name} is saved and paid ${amount}.")],
                expect={f"payees.{name}": iban, f"accounts.{chk}.balance": state["accounts"][chk]["balance"] - amount},
                milestones=[milestone("add_payee", name=name, iban=iban), milestone("pay", payee=name, amount=amount)])


def lost_card(rng, state):
    kind = rng.choice(["checking", "savings"])
    card = next(c for c, v in state["cards"].items() if v["account"] == _acct(state, kind))
    return dict(goal=f"I lost the card for my {kind} account. Please freeze it.",
                solution=[calls(call("accounts"), call("cards")), calls(call("freeze", card=card)),
                          say(f"Card {card} is frozen.")],
                expect={f"cards.{card}.status": "frozen"}, milestones=[milestone("freeze", card=card)])


def limit(rng, state):
    card, value = rng.choice(list(state["cards"])), rng.choice([200, 500, 1500, 2000, 5000])
    return dict(goal=f"Set the limit of card {card} to ${value}.",
                solution=[calls(call("set_limit", card=card, limit=value)), say(f"The limit of card {card} is now ${value}.")],
                expect={f"cards.{card}.limit": value}, milestones=[milestone("set_limit", card=card, limit=value)])


def dispute(rng, state):
    txn = rng.choice(list(state["txns"]))
    t = state["txns"][txn]
    return dict(goal=f"I don't recognise the ${-t['amount']} charge at {t['merchant']} on my checking account.",
                solution=[calls(call("accounts")), calls(call("history", account=t["account"])),
                          calls(call("dispute", txn=txn)), say(f"I disputed transaction {txn}.")],
                expect={f"txns.{txn}.disputed": True}, milestones=[milestone("dispute", txn=txn)])


def balance(rng, state):
    kind = rng.choice(["checking", "savings"])
    amount = state["accounts"][_acct(state, kind)]["balance"]
    return dict(goal=f"What is the balance of my {kind} account?",
                solution=[calls(call("accounts")), say(f"Your {kind} balance is ${amount}.")],
                unchanged=True, milestones=[said(str(amount))])


def overdraft(rng, state):
    have = state["accounts"][_acct(state, "savings")]["balance"]
    return dict(goal=f"Transfer ${have + rng.randint(1, 5000)} from my savings to my checking account.",
                **refuse(f"your savings balance is only ${have}, so I can't make that transfer.",
                         calls(call("accounts"))))


Bank.scenarios = (transfer, pay_ask, new_payee, lost_card, limit, dispute, balance, overdraft)
