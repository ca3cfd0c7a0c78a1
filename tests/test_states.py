"""farm.states is the one home of statuses (and round kinds): no other module of farm/ or web/ spells one
out, its sets say what their names say, and the code changes statuses only as ``TRANSITIONS`` allows."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from farm import actions, dispatch, records, rounds, states
from farm.config import load_settings
from farm.db import Candidate, get_engine, migrate, session_scope
from farm.states import (
    BATCH_CLOSED,
    BATCH_LIVE,
    BATCH_OPEN,
    BATCH_STOPPED,
    CANDIDATE_FINAL,
    CANDIDATE_IN_FLIGHT,
    CANDIDATE_IN_PROGRESS,
    CANDIDATE_SETTLED,
    STAGE_INPUT,
    STAGE_OUTPUT,
    TRANSITIONS,
    BatchStatus,
    CandidateStatus,
    CandidateVerdict,
    ItemStatus,
    RoundKind,
)
from tests import pgutil

ROOT = Path(__file__).resolve().parent.parent
KINDS = (BatchStatus, ItemStatus, CandidateStatus)
#: Every word the statuses, the verdict column (spelled like two of them) and round kinds are written with.
WORDS = frozenset(s.value for kind in (*KINDS, CandidateVerdict, RoundKind) for s in kind)


# ------------------------------------------------------------------------------------ no literals elsewhere


def spelled_out(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, word)`` of each string constant in ``tree`` equal to a status word, except in two places
    where the word names a JSON field, not a status: a key of a dict display (``{"cancelled": changed}``,
    the cancel reply's field) and the key of a subscript (``progress["done"]``, the count of final
    candidates). Everywhere else (comparisons, call arguments, ``.values(status=...)``, tuples, defaults,
    ``Literal[...]`` annotations) the word must come from farm.states. Parts of longer strings (log lines,
    docstrings, f-strings) are not constants equal to a word, so they are not looked at."""
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            allowed.update(id(k) for k in node.keys if k is not None)
        elif isinstance(node, ast.Subscript):
            allowed.add(id(node.slice))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in WORDS and id(node) not in allowed
    ]


def offences(root: Path) -> list[str]:
    """``file:line: word`` for every status spelled out under root's farm/ and web/ (farm/states.py and the
    migrations, which keep their frozen literals, excepted)."""
    found = []
    for top in ("farm", "web"):
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root)
            if rel == Path("farm/states.py") or rel.parts[:2] == ("farm", "migrations"):
                continue
            for line, word in spelled_out(ast.parse(path.read_text(), str(rel))):
                found.append(f"{rel}:{line}: {word!r}")
    return found


def test_no_module_but_farm_states_spells_out_a_status():
    assert offences(ROOT) == [], "use farm.states instead of these literals"


@pytest.mark.parametrize(
    "source",
    [
        'if batch.status == "done": pass',
        'q.where(Item.status != "pending")',
        'update(Batch).values(status="cancelling")',
        'CLOSED = ("done", "cancelled", "failed")',
        'def f() -> Literal["passed", "rejected"]: ...',
        'x = {"a": "scored"}',
    ],
)
def test_a_status_spelled_out_is_found(source):
    assert spelled_out(ast.parse(source)) != []


@pytest.mark.parametrize("source", ['p["done"] - shown', 'out["done"] = 1', 'jsonify({"cancelled": True})'])
def test_a_json_key_spelled_like_a_status_is_not_a_status(source):
    assert spelled_out(ast.parse(source)) == []


def test_a_literal_planted_in_a_copy_of_the_tree_is_named_with_its_file_and_line(tmp_path):
    for top in ("farm", "web"):
        (tmp_path / top).mkdir()
    (tmp_path / "farm" / "states.py").write_text('DONE = "done"\n')
    (tmp_path / "farm" / "migrations").mkdir()
    (tmp_path / "farm" / "migrations" / "v1.py").write_text('STATUS = "queued"\n')
    planted = 'n = p["done"]\nif b.status in ("queued", "running"):\n    pass\n'
    (tmp_path / "web" / "page.py").write_text(planted)
    assert offences(tmp_path) == ["web/page.py:2: 'queued'", "web/page.py:2: 'running'"]


#: A template comparing a status with a quoted word (``c.status == 'passed'``, ``status in ('a', 'b')``).
TEMPLATE_COMPARISON = re.compile(r"status\s*(?:==|!=|(?:not\s+)?in)\s*\(?\s*['\"](\w+)['\"]")


def template_offences(root: Path) -> list[str]:
    """``file:line: word`` for every template under web/templates that compares a status with a spelled-out
    word; they compare with the enums farm.states puts in the Jinja globals (web/filters.py). Counts read by
    key (``p.get('failed')``) are JSON fields, not statuses."""
    found = []
    for path in sorted((root / "web" / "templates").rglob("*.html")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            found += [
                f"{path.relative_to(root)}:{number}: {word!r}"
                for word in TEMPLATE_COMPARISON.findall(line)
                if word in WORDS
            ]
    return found


def test_no_template_compares_a_status_with_a_spelled_out_word():
    assert template_offences(ROOT) == [], "compare with CandidateStatus.X / BatchStatus.X"


def test_a_status_comparison_planted_in_a_template_is_found(tmp_path):
    (tmp_path / "web" / "templates").mkdir(parents=True)
    page = "{% if c.status == 'passed' %}x{% endif %}\n{{ p.get('failed') }}\n{% if b.status in ('done',) %}"
    (tmp_path / "web" / "templates" / "page.html").write_text(page)
    assert template_offences(tmp_path) == [
        "web/templates/page.html:1: 'passed'",
        "web/templates/page.html:3: 'done'",
    ]


# ------------------------------------------------------------------------------------------------------- sets


def test_the_two_active_sets_differ_by_cancelling_only():
    """BATCH_OPEN (what dispatch sends, cancel and resume act on) and BATCH_LIVE (what placement counts)
    were both called ACTIVE_BATCH: a cancelling batch takes no new work, but its sent slices still run."""
    assert set(BATCH_LIVE) - set(BATCH_OPEN) == {BatchStatus.CANCELLING}
    assert set(BATCH_OPEN) < set(BATCH_LIVE)


def test_batch_sets_partition_the_statuses():
    assert set(BATCH_LIVE) | set(BATCH_CLOSED) == set(BatchStatus)
    assert not set(BATCH_LIVE) & set(BATCH_CLOSED)
    assert set(BATCH_STOPPED) == {BatchStatus.CANCELLING, BatchStatus.CANCELLED}
    assert "failed" not in {s.value for s in BatchStatus}  # waited for once, never written


def test_candidate_sets():
    assert set(CANDIDATE_SETTLED) == {*CANDIDATE_FINAL, CandidateStatus.SCORED}
    assert set(CANDIDATE_IN_PROGRESS) == set(CandidateStatus) - set(CANDIDATE_FINAL)
    assert CANDIDATE_IN_PROGRESS[0] == CandidateStatus.PENDING
    assert set(CANDIDATE_IN_FLIGHT) == set(CANDIDATE_IN_PROGRESS) - {
        CandidateStatus.PENDING,
        CandidateStatus.SCORED,
    }
    assert {v.value for v in CandidateVerdict} <= {s.value for s in CandidateStatus}


def test_each_stage_hands_on_to_the_next_one_s_input():
    stages = list(STAGE_INPUT)
    assert stages == list(STAGE_OUTPUT) == ["generate", "moderate", "validate", "score"]
    assert STAGE_INPUT["generate"] == states.INITIAL[CandidateStatus]
    for this, after in zip(stages, stages[1:], strict=False):
        assert STAGE_OUTPUT[this] == STAGE_INPUT[after]
        assert STAGE_INPUT[after] in TRANSITIONS[CandidateStatus][STAGE_INPUT[this]]


def test_statuses_compare_and_serialise_as_the_strings_sql_stores():
    assert BatchStatus.DONE == "done" and f"{CandidateStatus.PASSED}" == "passed"
    assert {"done": 1}[ItemStatus.DONE] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_transitions_stay_within_their_kind_and_reach_every_status(kind):
    table = TRANSITIONS[kind]
    assert all(isinstance(s, kind) for old, new in table.items() for s in (old, *new))
    reached, todo = set(), [states.INITIAL[kind]]
    while todo:
        s = todo.pop()
        if s not in reached:
            reached.add(s)
            todo += table.get(s, ())
    assert reached == set(kind)


def test_allowed():
    assert states.allowed(BatchStatus, "queued", "running")
    assert states.allowed(BatchStatus, "done", "done")
    assert not states.allowed(BatchStatus, "cancelled", "running")
    assert not states.allowed(ItemStatus, "pending", "done")
    assert not states.allowed(CandidateStatus, "rejected", "pending")
    with pytest.raises(ValueError):
        states.allowed(BatchStatus, "running", "failed")


# ------------------------------------------------------------------------------ transitions the code performs

MANIFEST = """
name: states
model: tiny
defaults: {candidates: 3, steps: 1, size: 32x32}
items:
  - "a kite"
  - "a boat"
"""
CHECKS = ("moderate", "validate", "score")
TABLES = {"batches": BatchStatus, "items": ItemStatus, "candidates": CandidateStatus}


def _log_status_changes(url: str) -> None:
    """SQLite triggers that log every status a row is inserted with and every status change, whichever code
    path (ORM or Core) writes it."""
    with get_engine(url).begin() as conn:
        conn.exec_driver_sql("CREATE TABLE status_log (tbl TEXT, old TEXT, new TEXT)")
        for table in TABLES:
            conn.exec_driver_sql(
                f"CREATE TRIGGER log_{table}_insert AFTER INSERT ON {table} BEGIN "
                f"INSERT INTO status_log VALUES ('{table}', NULL, NEW.status); END"
            )
            conn.exec_driver_sql(
                f"CREATE TRIGGER log_{table}_update AFTER UPDATE OF status ON {table} "
                f"WHEN NEW.status IS NOT OLD.status BEGIN "
                f"INSERT INTO status_log VALUES ('{table}', OLD.status, NEW.status); END"
            )


def _logged(url: str) -> set[tuple[str, str | None, str]]:
    with get_engine(url).begin() as conn:
        return set(conn.exec_driver_sql("SELECT tbl, old, new FROM status_log").all())


@pytest.fixture
def logged_farm(monkeypatch, tmp_path):
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    migrate(settings.database_url)
    _log_status_changes(settings.database_url)
    monkeypatch.setattr(dispatch, "send_item", lambda *_a, **_kw: None)
    nothing = SimpleNamespace(apply_async=lambda **_kw: None)
    monkeypatch.setattr(dispatch, "app_for", lambda _s: SimpleNamespace(signature=lambda *_a, **_kw: nothing))
    return settings


def _new_batch(settings) -> tuple[str, list[list[str]]]:
    """A batch of two items of three candidates; returns its id and each item's candidate ids."""
    manifest, items = dispatch.plan(MANIFEST, settings=settings)
    batch_id = dispatch.create_batch(manifest, items, MANIFEST, settings=settings).batch_id
    with session_scope(settings.database_url) as s:
        rows = s.execute(
            select(Candidate.item_id, Candidate.id)
            .where(Candidate.batch_id == batch_id)
            .order_by(Candidate.id)
        ).all()
    by_item: dict[str, list[str]] = {}
    for item_id, cid in rows:
        by_item.setdefault(item_id, []).append(cid)
    return batch_id, [by_item[k] for k in sorted(by_item)]


def _run(url: str, ids: list[str], stages: tuple[str, ...], results: dict[str, list[dict | None]]) -> None:
    """Start ``stages`` on ``ids`` and write each stage's results (``results[stage][n]`` for ``ids[n]``,
    None: no result, ``{}``: the stage passed it) as a slice task does."""
    start = records.begin_stages(url, ids, stages, max_attempts=3)
    held = {c.id: c for c in start.todo}
    writes = [
        records.StageWrite(
            stage,
            {cid: r for cid, r in zip(ids, results[stage], strict=True) if r is not None and cid in held},
            {"s": 0.1},
            started=held,
        )
        for stage in stages
    ]
    records.apply_stages(url, writes)


def _finish(url: str, item_id: str, winners: list[str]) -> None:
    rounds.finish_item(
        url, item_id, ranking=winners, winners=winners, scores=dict.fromkeys(winners, 1.0), rounds=0
    )


@pgutil.sqlite_pass_only
def test_every_status_change_the_code_makes_is_an_allowed_transition(logged_farm):
    settings = logged_farm
    url = settings.database_url
    rejected = {"status": CandidateStatus.REJECTED, "verdict": CandidateVerdict.REJECTED}

    # A batch run to the end: every way a stage ends a candidate, a lost image, ranks, then a retry.
    batch_id, (a, b) = _new_batch(settings)
    dispatch.dispatch_batch(batch_id, settings=settings)
    _run(url, a, ("generate",), {"generate": [{}, {}, records.failure("generate", "boom")]})
    start = records.begin_stages(url, a[:2], CHECKS, max_attempts=3)
    held = {c.id: c for c in start.todo}
    lost = {a[0]: {}, a[1]: records.image_lost(held[a[1]])}
    records.apply_stages(url, [records.StageWrite("moderate", lost, {}, started=held)])
    _run(url, [a[0]], ("validate", "score"), {"validate": [{}], "score": [{}]})
    _run(url, [a[1]], ("generate",), {"generate": [rejected]})
    _run(url, b, ("generate",), {"generate": [{}, {}, {}]})
    _run(
        url,
        b,
        CHECKS,
        {
            "moderate": [rejected, {}, {}],
            "validate": [None, rejected, {}],
            "score": [None, None, records.failure("score", "boom")],
        },
    )
    _finish(url, _item_of(url, b[0]), [])
    _finish(url, _item_of(url, a[0]), [a[0]])
    actions.retry_failed(batch_id, settings=settings)

    # A batch cancelled while a slice of it runs, and one cancelled before anything was sent.
    running_id, (c, d) = _new_batch(settings)
    dispatch.dispatch_batch(running_id, settings=settings)
    _run(url, c, ("generate",), {"generate": [{}, {}, {}]})
    _run(url, c[:1], ("moderate", "validate", "score"), {"moderate": [{}], "validate": [{}], "score": [{}]})
    dispatch.cancel(running_id, settings=settings)
    records.begin_stages(url, c[1:], CHECKS, max_attempts=3)
    _finish(url, _item_of(url, c[0]), [c[0]])
    _finish(url, _item_of(url, d[0]), [])
    queued_id, (e, f) = _new_batch(settings)
    dispatch.cancel(queued_id, settings=settings)
    _finish(url, _item_of(url, e[0]), [])
    _finish(url, _item_of(url, f[0]), [])

    seen = _logged(url)
    wrong = [
        (table, old, new)
        for table, old, new in seen
        if (old is None and new != states.INITIAL[TABLES[table]])
        or (old is not None and not states.allowed(TABLES[table], old, new))
    ]
    assert wrong == []
    # The walk above makes every batch and item transition there is, and most candidate ones.
    for table, kind in TABLES.items():
        made = {(old, new) for t, old, new in seen if t == table and old is not None}
        table_pairs = {(old, new) for old, news in TRANSITIONS[kind].items() for new in news}
        unmade = table_pairs - made
        if kind is CandidateStatus:
            assert len(made) >= 15, sorted(unmade)
        else:
            assert unmade == set(), f"{table}: {sorted(unmade)}"


def _item_of(url: str, candidate_id: str) -> str:
    with session_scope(url) as s:
        return s.scalar(select(Candidate.item_id).where(Candidate.id == candidate_id))
