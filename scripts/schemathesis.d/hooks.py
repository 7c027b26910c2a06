"""Schemathesis hooks for scripts/schemathesis.

An Idempotency-Key the generator produced is made unique per request (when it is valid:
1 to 255 visible ASCII characters), so two different bodies never share a key. A key reused
with another body is rightly refused with 422 (the contract), which Schemathesis would
otherwise report as a schema-valid request rejected; the reuse itself is covered by
services/order-service/tests. Invalid keys are left as generated, for the negative tests.
"""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"[!-~]{1,255}")


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    headers = case.headers or {}
    for name in list(headers):
        value = headers[name]
        if name.lower() == "idempotency-key" and isinstance(value, str) and VALID_KEY.fullmatch(value):
            headers[name] = (value[:200] + "-" + uuid.uuid4().hex)[:255]
