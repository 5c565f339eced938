"""Payment, messaging and backend APIs: Stripe, PayPal, Twilio, SendGrid, Supabase.

Their API calls are not billed per request (Stripe and PayPal charge a
share of the payment, not the call), except Twilio messages, whose
response carries the price, and SendGrid mail, priced per message sent.
"""

from __future__ import annotations

from collections.abc import Callable

from ._call import Call
from ._draft import UsageDraft, as_count, as_number
from .jsonbody import BodyError

__all__ = ["SERVICE_PARSERS"]


def _resource(path: str) -> str:
    parts = [p for p in path.split("/") if p and not p[:1].isdigit() and not p.startswith("v")]
    parts = [
        p for p in parts if not (len(p) > 20 or "_" in p[:4])
    ]  # drop ids like pi_3Nx..., SM...
    return ".".join(parts[-2:]) if parts else "unknown"


def parse_not_per_call(call: Call, draft: UsageDraft) -> None:
    draft.endpoint = _resource(call.path)
    provider = call.provider.id if call.provider else "this provider"
    draft.unpriced_reason = f"{provider} API calls are not billed per request"


def parse_twilio(call: Call, draft: UsageDraft) -> None:
    draft.endpoint = "messages" if "/Messages" in call.path else _resource(call.path)
    if draft.endpoint != "messages":
        draft.unpriced_reason = "only messages are priced"
        return
    body: object = None
    if call.body.lstrip()[:1] == b"{":
        try:
            body = call.json()
        except BodyError as exc:
            draft.error(str(exc))
    if not isinstance(body, dict):
        return
    segments = as_count(body.get("num_segments"))
    if segments is not None:
        draft.set("requests", segments)
    price = body.get("price")
    unit = body.get("price_unit")
    if isinstance(price, str) and price.startswith("-"):
        price = price[1:]  # Twilio quotes charges as negative amounts
    amount = as_number(price)
    if amount is not None and (unit in (None, "USD", "usd")):
        draft.reported_cost_usd = amount
    # Otherwise (price is null until the message is sent) our per-segment rate applies.
    if isinstance(body.get("sid"), str):
        draft.response_id = body["sid"][:64]


def parse_sendgrid(call: Call, draft: UsageDraft) -> None:
    draft.endpoint = _resource(call.path)
    if not call.path.rstrip("/").endswith("/mail/send"):
        draft.unpriced_reason = "only sent mail is priced"
        return
    draft.endpoint = "mail.send"
    personalizations = call.request_field("personalizations")
    count = 0
    if isinstance(personalizations, list):
        for item in personalizations:
            if isinstance(item, dict):
                for key in ("to", "cc", "bcc"):
                    value = item.get(key)
                    count += len(value) if isinstance(value, list) else 0
    draft.estimate("requests", max(count, 1))
    draft.unpriced_reason = "SendGrid bills monthly plans, not per email"


SERVICE_PARSERS: dict[str, Callable[[Call, UsageDraft], None]] = {
    "stripe": parse_not_per_call,
    "paypal": parse_not_per_call,
    "supabase": parse_not_per_call,
    "twilio": parse_twilio,
    "sendgrid": parse_sendgrid,
}
