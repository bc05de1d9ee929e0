"""A probe's own OTLP/HTTP exports make no span, at whatever address they arrive.

The exporter-endpoint filter drops connections by address; an export that
arrives elsewhere (a collector behind a Service or a hostPort, or this node's
collector receiving another node's probe) is known by its User-Agent. Here the
Python server stands for that collector, on one kept-alive connection.
"""

from __future__ import annotations

from probe.export.otlp import USER_AGENT


def test_a_probes_exports_make_no_span_and_the_rest_of_the_connection_does(
    pyserver, probe_capture, http_client
):
    with probe_capture("-P", str(pyserver.port)) as probe, http_client(pyserver) as client:
        export = client.request("POST", "/v1/traces", b"\n\x00", headers={"User-Agent": USER_AGENT})
        other_post = client.request(
            "POST", "/v1/other", b"x", headers={"User-Agent": "collector-test/1"}
        )
        probes_get = client.request("GET", "/after", headers={"User-Agent": USER_AGENT})
    assert [export.status, other_post.status, probes_get.status] == [200, 200, 200]
    assert probe.select(path="/v1/traces") == [], probe.describe()  # neither end
    probe.one("SERVER", "/v1/other", pyserver.pid)
    probe.one("CLIENT", "/v1/other", other_post.pid)
    probe.one("SERVER", "/after", pyserver.pid)  # only POSTs are exports
