import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from cotune.errors import DataError, ToolError
from cotune.spec import Component
from cotune.tools import ToolContext, registry, run_tool
from cotune.tools import bm25 as bm25_module
from cotune.tools.bm25 import BM25Index, get_index
from cotune.tools.http_search import check_url, parse_results, search_http
from cotune.tools.registry import get_python_tool, known_python_tools, register_tool

CORPUS = [
    {"id": "d0", "text": "the code of zorpa is 417."},
    {"id": "d1", "text": "the code of kalo is 111.", "title": "Kalo"},
    {"id": "d2", "text": "bananas are yellow fruit."},
    {"id": "d3", "text": "the code of zorpa is 417."},  # same text as d0: a tie
]


def tool(tool_name: str, reads: list[str] | None = None, **args: Any) -> Component:
    return Component(
        name="t", kind="tool", tool=tool_name, reads=reads or ["query"], writes="out", args=args
    )


def write_corpus(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- python tools -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _forget_test_tools() -> Iterator[None]:
    yield
    for name in [n for n in registry.known_python_tools() if n.startswith("_test_")]:
        registry._TOOLS.pop(name)


def test_builtin_python_tools() -> None:
    assert {"count_lines", "word_count"} <= known_python_tools()
    assert get_python_tool("count_lines")("a\n\n b \n") == "2"
    assert get_python_tool("count_lines")(["x", "", "y", "z"]) == "3"
    assert get_python_tool("word_count")("two words\nand three more") == "5"
    assert get_python_tool("word_count")(["one", "two three"]) == "3"


def test_unknown_python_tool_is_named() -> None:
    with pytest.raises(ToolError, match=r"'rm_rf' is not registered"):
        get_python_tool("rm_rf")


def test_register_tool_refuses_a_taken_name() -> None:
    with pytest.raises(ValueError, match=r"'count_lines' is already registered"):
        register_tool("count_lines")(lambda text: text)


def test_run_python_tool_binds_single_field_positionally() -> None:
    component = tool("python", reads=["passages"], function="count_lines")
    out = run_tool(component, [{"passages": ["a", "b"]}, {"passages": "x\ny\nz"}], ToolContext())
    assert out == ["2", "3"]


def test_run_python_tool_binds_fields_by_name() -> None:
    @register_tool("_test_join")
    def join(first: str, second: str) -> str:
        return f"{first}+{second}"

    component = tool("python", reads=["second", "first"], function="_test_join")
    assert run_tool(component, [{"first": "a", "second": "b"}], ToolContext()) == ["a+b"]

    wrong = tool("python", reads=["first", "third"], function="_test_join")
    with pytest.raises(ToolError, match=r"component 't': python tool '_test_join'.*cannot take"):
        run_tool(wrong, [{"first": "a", "third": "c"}], ToolContext())


def test_python_tool_failure_names_component_and_tool() -> None:
    @register_tool("_test_fails")
    def fails(text: str) -> str:
        raise RuntimeError("boom")

    with pytest.raises(ToolError, match=r"component 't': python tool '_test_fails' failed.*boom"):
        run_tool(tool("python", function="_test_fails"), [{"query": "x"}], ToolContext())


def test_run_tool_refuses_unknown_args_and_missing_inputs() -> None:
    with pytest.raises(ToolError, match=r"component 't': field 'args.code' is unknown"):
        run_tool(
            tool("python", function="count_lines", code="import os"),
            [{"query": "x"}],
            ToolContext(),
        )
    with pytest.raises(ToolError, match=r"missing the field\(s\) \['query'\]"):
        run_tool(tool("python", function="count_lines"), [{"other": "x"}], ToolContext())


# -- bm25 -------------------------------------------------------------------------------------


def test_bm25_ranks_and_renders_titles() -> None:
    index = BM25Index.from_rows(CORPUS)
    assert index.search("kalo", 3) == ["Kalo: the code of kalo is 111."]
    top = index.search("what is the code of zorpa?", 3)
    assert top[:2] == ["the code of zorpa is 417."] * 2
    assert top[2] == "Kalo: the code of kalo is 111."  # shares only "code"


def test_bm25_ties_break_by_corpus_order() -> None:
    rows = [{"id": f"x{i}", "text": f"same words here {i}"} for i in range(5)]
    index = BM25Index.from_rows(rows)
    assert index.search("same words", 3) == [
        "same words here 0",
        "same words here 1",
        "same words here 2",
    ]
    assert index.search("same words", 3) == index.search("same words", 3)


def test_bm25_search_many_and_unknown_terms() -> None:
    index = BM25Index.from_rows(CORPUS)
    results = index.search_many(["bananas", "no such term", "the of is"], 2)
    assert results == [["bananas are yellow fruit."], [], []]


def test_get_index_caches_per_file_version(tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "kb.jsonl", CORPUS)
    first = get_index(path)
    assert get_index(tmp_path / "." / "kb.jsonl") is first  # same file, same index
    write_corpus(path, [{"id": "n", "text": "a new corpus about zorpa"}])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # mtime moves forward
    second = get_index(path)
    assert second is not first
    assert second.search("zorpa", 3) == ["a new corpus about zorpa"]
    bm25_module.clear_cache()


def test_get_index_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.jsonl"):
        get_index(tmp_path / "nope.jsonl")


def test_run_bm25_tool_resolves_corpus_against_base_dir(tmp_path: Path) -> None:
    write_corpus(tmp_path / "kb.jsonl", CORPUS)
    component = tool("bm25", corpus="kb.jsonl", k=1)
    out = run_tool(
        component, [{"query": "kalo"}, {"query": ["zorpa", "code"]}], ToolContext(base_dir=tmp_path)
    )
    assert out == [["Kalo: the code of kalo is 111."], ["the code of zorpa is 417."]]


def test_run_bm25_tool_uses_resolver_and_default_k(tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "stored-blob", CORPUS)
    jsonl = path.rename(tmp_path / "stored.jsonl")
    seen = []

    def resolve(name: str) -> Path:
        seen.append(name)
        return jsonl

    out = run_tool(
        tool("bm25", corpus="file-abc"), [{"query": "code"}], ToolContext(resolve_corpus=resolve)
    )
    assert seen == ["file-abc"]
    assert len(out[0]) == 3  # default k


def test_run_bm25_tool_refuses_bad_k(tmp_path: Path) -> None:
    write_corpus(tmp_path / "kb.jsonl", CORPUS)
    with pytest.raises(ToolError, match=r"component 't': field 'args.k'"):
        run_tool(
            tool("bm25", corpus="kb.jsonl", k=0), [{"query": "x"}], ToolContext(base_dir=tmp_path)
        )


# -- http_search ------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    mode = "ok"
    calls = 0

    def do_GET(self) -> None:
        cls = type(self)
        cls.calls += 1
        query = parse_qs(urlsplit(self.path).query)
        if cls.mode == "flaky" and cls.calls == 1:
            self._send(503, {"error": "try again"})
        elif cls.mode == "slow":
            time.sleep(0.5)
            self._send(200, [])
        elif cls.mode == "down":
            self._send(500, {})
        elif cls.mode == "list":
            self._send(200, ["plain one", "plain two", "plain three"])
        elif cls.mode == "bad":
            self._send(200, {"results": [{"title": "no text"}]})
        else:
            q, k = query["q"][0], int(query["k"][0])
            results = [{"text": f"{q} result {i}", "title": f"T{i}"} for i in range(k + 2)]
            self._send(200, {"results": results})

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out first (test_http_search_times_out)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.mode, _Handler.calls = "ok", 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/search"
    httpd.shutdown()
    httpd.server_close()


def local_search(url: str, query: str, k: int, timeout: float = 10.0) -> list[str]:
    """search_http with the test server's host allowed, internal address included."""
    return search_http(
        url, query, k, allowed_hosts={"127.0.0.1"}, private_hosts={"127.0.0.1"}, timeout=timeout
    )


def test_http_search_returns_top_k(server: str) -> None:
    assert local_search(server, "zorpa code", 2) == [
        "T0: zorpa code result 0",
        "T1: zorpa code result 1",
    ]


def test_http_search_accepts_a_plain_list(server: str) -> None:
    _Handler.mode = "list"
    assert local_search(server, "q", 2) == ["plain one", "plain two"]


def test_http_search_retries_once(server: str) -> None:
    _Handler.mode = "flaky"
    assert len(local_search(server, "q", 1)) == 1
    assert _Handler.calls == 2


def test_http_search_gives_up_after_the_retry(server: str) -> None:
    _Handler.mode = "down"
    with pytest.raises(ToolError, match=r"host '127.0.0.1' failed twice \(HTTP 500\)"):
        local_search(server, "q", 1)
    assert _Handler.calls == 2


def test_http_search_times_out(server: str) -> None:
    _Handler.mode = "slow"
    with pytest.raises(ToolError, match=r"host '127.0.0.1' failed twice.*Timeout"):
        local_search(server, "q", 1, timeout=0.1)


def test_http_search_refuses_a_bad_answer(server: str) -> None:
    _Handler.mode = "bad"
    with pytest.raises(ToolError, match=r"host '127.0.0.1' answered a result"):
        local_search(server, "q", 1)


def test_http_search_refuses_hosts_off_the_allow_list(server: str) -> None:
    with pytest.raises(ToolError, match=r"host '127.0.0.1' is not on the allow-list"):
        search_http(server, "q", 1, allowed_hosts={"search.example.com"})
    assert _Handler.calls == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:9/search",
        "http://127.0.0.1/search",
        "http://10.1.2.3/search",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/search",
        "http://[::ffff:127.0.0.1]/search",
        "http://0.0.0.0/search",
        "http://100.100.100.200/latest/meta-data",  # carrier-grade NAT (100.64.0.0/10)
        "http://[::ffff:100.64.0.1]/search",
        "http://198.18.0.1/search",  # benchmarking
        "http://224.0.0.1/search",
    ],
)
def test_http_search_refuses_internal_addresses(url: str) -> None:
    host = urlsplit(url).hostname
    assert host is not None
    with pytest.raises(ToolError, match=rf"host '{host}' resolves to the internal address"):
        check_url(url, allowed_hosts={host})


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "http:///nohost", "http://127.0.0.1:x/"]
)
def test_http_search_refuses_non_http_urls(url: str) -> None:
    with pytest.raises(ToolError, match=r"not an http"):
        check_url(url, allowed_hosts={"127.0.0.1", ""})


def test_parse_results_shapes() -> None:
    assert parse_results({"results": ["a", {"text": "b"}, {"text": "c", "title": "C"}]}) == [
        "a",
        "b",
        "C: c",
    ]
    with pytest.raises(ValueError, match=r"nor a JSON list"):
        parse_results({"hits": []})


def test_run_http_search_tool(server: str) -> None:
    ctx = ToolContext(allowed_hosts={"127.0.0.1"}, private_hosts={"127.0.0.1"})
    out = run_tool(tool("http_search", url=server, k=1), [{"query": "a"}, {"query": "b"}], ctx)
    assert out == [["T0: a result 0"], ["T0: b result 0"]]
    with pytest.raises(ToolError, match=r"component 't': http_search: host '127.0.0.1' resolves"):
        run_tool(
            tool("http_search", url=server),
            [{"query": "a"}],
            ToolContext(allowed_hosts={"127.0.0.1"}),
        )
