"""cli.py: the common options work before or after the verb."""
import pytest

from launcher import cli


@pytest.mark.parametrize("argv,want", [
    (["status"], (None, False, False)),
    (["--debug", "status"], (None, False, True)),
    (["status", "--debug"], (None, False, True)),
    (["--hosts", "a", "status"], ("a", False, False)),
    (["status", "--hosts", "b", "--accept-new-host-key"], ("b", True, False)),
    (["--hosts", "a", "--accept-new-host-key", "--debug", "logs", "3"], ("a", True, True)),
    (["--hosts", "a", "status", "--hosts", "b"], ("b", False, False)),
    (["submit", "--debug", "--", "x", "--hosts", "c"], (None, False, True)),
])
def test_common_options_before_or_after_the_verb(argv, want):
    args = cli.build_parser().parse_args(argv)
    assert (args.hosts, args.accept_new_host_key, args.debug) == want
    if args.verb == "submit":
        assert args.command == ["--", "x", "--hosts", "c"]  # the job's own arguments
