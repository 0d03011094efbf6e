"""Request validation and auth of the OpenAI-compatible API (pure functions, no Ray)."""

import json

import pytest

from mote_ray.serving.api import ApiError, check_auth, key_digest, parse_request

GOOD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({**GOOD, "messages": "x"}).encode(), 400, "messages"),
    (json.dumps({**GOOD, "messages": []}).encode(), 400, "messages"),
    (json.dumps({**GOOD, "messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "role"),
    (json.dumps({**GOOD, "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({**GOOD, "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({**GOOD, "mote": {"mode": "sideways"}}).encode(), 400, "mote.mode"),
    (json.dumps({**GOOD, "messages": [{"role": "assistant", "content": "x"}]}).encode(), 400, "last message"),
    (json.dumps({**GOOD, "model": "other"}).encode(), 404, "not served"),
])
def test_bad_requests_get_the_right_4xx(body, status, needle):
    with pytest.raises(ApiError) as e:
        parse_request(body, "m")
    assert e.value.status == status and needle in e.value.message
    assert e.value.body()["error"]["message"] == e.value.message


def test_good_request_and_openai_extras_pass():
    req = parse_request(json.dumps({**GOOD, "n": 1, "user": "u", "mote": {"mode": "full", "return_stages": True}}).encode(), "m")
    assert req.mote.mode == "full" and req.mote.return_stages


def test_auth_compares_digests():
    d = key_digest("s3cret")
    check_auth("Bearer s3cret", d)
    check_auth(None, None)
    for header in (None, "", "Bearer wrong", "s3cret", "Basic s3cret"):
        with pytest.raises(ApiError) as e:
            check_auth(header, d)
        assert e.value.status == 401
