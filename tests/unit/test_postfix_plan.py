"""The `torroute postfix setup` plan as pure data: parsing postconf output, the transport_maps
list, what is changed (and what never is), conflicts for `remove`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torroute.errors import ConfigError
from torroute.mta.postfix import (
    CLEAR_NET_PARAMETERS,
    RECIPIENT_LIMIT,
    Change,
    SetupOptions,
    conflict_diff,
    conflicts,
    join_maps,
    make_plan,
    parse_postconf_m,
    parse_postconf_n,
    parse_unused,
    split_maps,
)

TABLE = "proxy:socketmap:unix:/run/torroute/socketmap.sock:transport"
PIPE = SetupOptions(program="/usr/bin/torroute", user="torroute")
LMTP = SetupOptions(mode="lmtp")

table_names = st.from_regex(r"[a-z]{2,8}:/[a-z0-9/._-]{1,20}(:[a-z]{1,8})?", fullmatch=True)
param_names = st.from_regex(r"[a-z][a-z0-9_]{0,30}", fullmatch=True)
values = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")),
                 max_size=40).map(str.strip)


@given(st.lists(table_names, max_size=6), st.sampled_from([", ", ",", " ", ",\n    "]))
def test_split_maps_inverts_any_separator(tables: list[str], sep: str) -> None:
    assert split_maps(sep.join(tables)) == tables
    assert split_maps(join_maps(tables)) == tables


def test_split_maps_keeps_inline_tables_whole() -> None:
    value = "inline:{ a.test=smtp:[x], b.test=error:nope }, hash:/etc/postfix/transport"
    assert split_maps(value) == ["inline:{ a.test=smtp:[x], b.test=error:nope }",
                                 "hash:/etc/postfix/transport"]


@given(st.dictionaries(param_names, values, max_size=10))
def test_parse_postconf_n_round_trips(params: dict[str, str]) -> None:
    text = "".join(f"{k} = {v}\n" if v else f"{k} =\n" for k, v in params.items())
    params.pop("config_directory", None)
    assert parse_postconf_n(text + "config_directory = /tmp/x\n") == params


@given(st.text(max_size=40).filter(lambda s: s.strip() and " =" not in s))
def test_parse_postconf_n_rejects_other_lines(line: str) -> None:
    with pytest.raises(ValueError):
        parse_postconf_n(line + "\n")


def test_parse_postconf_m() -> None:
    text = ("smtp       unix  -       -       n       -       -       smtp\n"
            "torroute   unix  -       n       n       -       -       pipe flags=q "
            "user=nobody argv=/x deliver\n")
    services = parse_postconf_m(text)
    assert services["smtp/unix"] == ("smtp", "unix", "-", "-", "n", "-", "-", "smtp")
    assert services["torroute/unix"][-3:] == ("user=nobody", "argv=/x", "deliver")
    with pytest.raises(ValueError):
        parse_postconf_m("smtp unix -\n")


def test_fresh_config_pipe_plan() -> None:
    plan = make_plan(PIPE, {}, {})
    changes = {c.name: c for c in plan.changes}
    assert set(changes) == {"torroute/unix", "transport_maps", RECIPIENT_LIMIT}
    assert changes["transport_maps"] == Change("param", "transport_maps", None, TABLE)
    assert changes[RECIPIENT_LIMIT].after == "1"
    entry = changes["torroute/unix"].after
    assert entry == ("torroute unix - n n - - pipe flags=q user=torroute null_sender= "
                     "argv=/usr/bin/torroute deliver --sender=${sender} --nexthop=${nexthop} "
                     "-- ${recipient}")
    assert plan.changes[0].kind == "service"


def test_lmtp_plan_is_the_shipped_entry_and_no_recipient_limit() -> None:
    changes = {c.name: c.after for c in make_plan(LMTP, {}, {}).changes}
    assert changes == {"torroute-lmtp/unix": "torroute-lmtp unix - - n - - lmtp",
                       "transport_maps": TABLE,
                       # no slow start towards our own daemon (it caps each onion itself)
                       "torroute-lmtp_destination_concurrency_limit": "48",
                       "torroute-lmtp_initial_destination_concurrency": "48"}


def test_deliver_config_and_socket_options() -> None:
    options = SetupOptions(socket="inet:127.0.0.1:10025", deliver_config="/etc/t.toml",
                           proxy=False)
    changes = {c.name: c.after for c in make_plan(options, {}, {}).changes}
    assert changes["transport_maps"] == "socketmap:inet:127.0.0.1:10025:transport"
    assert " deliver --config=/etc/t.toml --sender=" in changes["torroute/unix"]


@given(st.lists(table_names.filter(lambda t: t != TABLE), max_size=5),
       st.dictionaries(st.sampled_from(CLEAR_NET_PARAMETERS), table_names, max_size=4))
def test_existing_tables_kept_after_ours_and_clear_net_untouched(
        tables: list[str], clear: dict[str, str]) -> None:
    params = {**clear, "transport_maps": join_maps(tables)} if tables else dict(clear)
    plan = make_plan(PIPE, params, {})
    after = {c.name: c.after for c in plan.changes}
    assert split_maps(after["transport_maps"]) == [TABLE, *tables]
    assert not set(after) & set(CLEAR_NET_PARAMETERS)
    # applied, the plan is empty: setup twice changes nothing
    applied = {**params, **{c.name: c.after for c in plan.changes if c.kind == "param"}}
    services = {c.name: tuple(c.after.split()) for c in plan.changes if c.kind == "service"}
    assert not make_plan(PIPE, applied, services)


def test_our_table_moves_to_the_front_once() -> None:
    params = {"transport_maps": f"hash:/etc/postfix/transport, {TABLE}"}
    [change] = [c for c in make_plan(PIPE, params, {}).changes if c.name == "transport_maps"]
    assert change.after == f"{TABLE}, hash:/etc/postfix/transport"


def test_conflicts_and_their_diff() -> None:
    state = {"changes": [
        {"kind": "param", "name": "transport_maps", "before": None, "after": TABLE},
        {"kind": "param", "name": RECIPIENT_LIMIT, "before": None, "after": "1"},
        {"kind": "service", "name": "torroute/unix", "before": None, "after": "torroute unix"
         " - n n - - pipe argv=/x"}]}
    services = {"torroute/unix": ("torroute", "unix", "-", "n", "n", "-", "-", "pipe",
                                  "argv=/x")}
    assert conflicts(state, {"transport_maps": TABLE, RECIPIENT_LIMIT: "1"}, services) == []
    found = conflicts(state, {"transport_maps": TABLE + ", hash:/x", RECIPIENT_LIMIT: "1"},
                      {})
    assert [c.name for c in found] == ["transport_maps", "torroute/unix"]
    diff = conflict_diff(found)
    assert f"-transport_maps = {TABLE}\n" in diff
    assert f"+transport_maps = {TABLE}, hash:/x\n" in diff
    assert "-torroute/unix = torroute unix" in diff


@pytest.mark.parametrize("kwargs", [{"mode": "smtp"}, {"socket": "/run/x.sock"},
                                    {"user": "root"}, {"program": "/usr/bin/tor route"}])
def test_bad_options_refused(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SetupOptions(**kwargs)


@given(st.dictionaries(param_names, values, max_size=6))
def test_parse_unused_reads_the_parameters_postconf_n_hides(params: dict[str, str]) -> None:
    stderr = "".join(f"postconf: warning: /etc/postfix/main.cf: unused parameter: {k}={v}\n"
                     for k, v in params.items())
    stderr += "postconf: warning: torroute_x: unknown parameter\n"
    assert parse_unused(stderr) == params


def test_a_new_socket_replaces_the_old_table_instead_of_stacking() -> None:
    old = SetupOptions(socket="unix:/run/old.sock")
    params = {"transport_maps": f"{old.table}, hash:/etc/postfix/transport"}
    [change] = [c for c in make_plan(PIPE, params, {}, replaces=(old.table,)).changes
                if c.name == "transport_maps"]
    assert change.after == f"{TABLE}, hash:/etc/postfix/transport"
