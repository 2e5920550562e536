"""Every command of the package, once: what the parser offers, what the agent serves, what only reads.

The umbrella's usage text, the thin client's "does the agent do this?"
(:mod:`vif_hotplug.agent.client`), the agent's dispatch and the
read-only/changing distinction all come from :data:`COMMANDS`; adding a
command touches this table and its runner.

No imports at all: the thin client imports this module under ``python3 -I
-S`` on every hotplug event, where even ``typing`` costs more than the
round trip to the agent. Annotations are strings.
"""


class Command:
    """One command. ``runner`` is ``"module:function"``, imported only when the command runs.

    * ``served``: the resident agent does it (a client hands it over);
      never the long-running forms (any of ``long_flags`` in argv).
    * ``reads_only``: it never changes the kernel or the state directory;
      ``read_only_flags`` make an otherwise changing command read-only
      (``--dry-run``).
    * ``part``: ``"runtime"``, or ``"lab"`` for what the separate lab part
      provides (absent from a driver domain that installed only the runtime).
    """

    __slots__ = (
        "long_flags",
        "name",
        "part",
        "program",
        "read_only_flags",
        "reads_only",
        "runner",
        "served",
        "summary",
    )

    def __init__(
        self, name: "str", summary: "str", runner: "str", *, served: "bool" = True, reads_only: "bool" = False,
        read_only_flags: "tuple[str, ...]" = (), long_flags: "tuple[str, ...]" = (), part: "str" = "runtime",
        program: "str | None" = None,
    ) -> None:
        self.name = name
        self.summary = summary
        self.runner = runner
        self.served = served
        self.reads_only = reads_only
        self.read_only_flags = read_only_flags
        self.long_flags = long_flags
        self.part = part
        #: The command's own program name, when it has one besides ``vif-hotplug NAME``.
        self.program = program

    def is_long(self, argv: "list[str]") -> "bool":
        return any(_flag(word, self.long_flags) for word in argv)

    def changes(self, argv: "list[str]") -> "bool":
        """Whether ``argv`` may change anything (``False`` for ``--dry-run`` and read-only commands)."""
        return not self.reads_only and not any(_flag(word, self.read_only_flags) for word in argv)


def _flag(word: "str", flags: "tuple[str, ...]") -> "bool":
    # "--dry-run" and "-n"; "--opt=value" forms; parsers refuse abbreviations, so none are matched here.
    return word.partition("=")[0] in flags


DRY_RUN = ("-n", "--dry-run")

COMMANDS: "tuple[Command, ...]" = (
    Command("route", "same as vif-route-qubes ARGS... (online/offline of one vif)", "vif_hotplug.vif_route:run",
            read_only_flags=DRY_RUN, program="vif-route-qubes"),
    Command("dns", "same as qubes-setup-dnat-to-ns ARGS... (DNS DNAT; --watch)", "vif_hotplug.setup_dnat_to_ns:run",
            read_only_flags=("--dry-run",), long_flags=("--watch",), program="qubes-setup-dnat-to-ns"),
    Command("init", "the netvm's base firewall, DNS guard and forwarding; then the DNS rules and reconcile "
            "(idempotent)", "vif_hotplug.cli:run_init", read_only_flags=DRY_RUN),
    Command("stop", "forwarding off (the init unit's stop)", "vif_hotplug.cli:run_stop"),
    Command("status", "desired against actual state per vif (--json); exit 1 on drift", "vif_hotplug.cli:run_status",
            reads_only=True),
    Command("reconcile", "make the kernel match XenStore for every vif (--dry-run)", "vif_hotplug.cli:run_reconcile",
            read_only_flags=DRY_RUN),
    Command("connected-ips", "bring the sets of connected VM addresses up to date (--watch)",
            "vif_hotplug.cli:run_connected_ips", long_flags=("--watch",)),
    Command("agent", "the resident agent serving all of the above on a Unix socket", "vif_hotplug.cli:run_agent",
            served=False),
    Command("lab", "run the whole system in network namespaces, no Xen needed (the lab part)",
            "vif_hotplug.lab.runner:run_command", served=False, part="lab"),
    Command("xenstored", "serve the XenStore wire protocol on a Unix socket (the lab part)",
            "vif_hotplug.lab.xenstored:run_command", served=False, part="lab"),
)

BY_NAME: "dict[str, Command]" = {c.name: c for c in COMMANDS}
#: Program name → its command (``vif-route-qubes`` is ``route``).
BY_PROGRAM: "dict[str, Command]" = {c.program: c for c in COMMANDS if c.program}
UMBRELLA = "vif-hotplug"


def command_of(prog: "str", argv: "list[str]") -> "tuple[Command | None, list[str]]":
    """The command ``prog argv`` runs and its own argv (``None`` for an unknown one)."""
    if prog == UMBRELLA:
        if not argv:
            return None, []
        return BY_NAME.get(argv[0]), argv[1:]
    return BY_PROGRAM.get(prog), argv


def served(prog: "str", argv: "list[str]") -> "bool":
    """Whether the agent does ``prog argv``: a served command, not in its long-running form."""
    command, rest = command_of(prog, argv)
    return command is not None and command.served and not command.is_long(rest)


def ident(command: "Command | None") -> "str":
    """The journal identifier of a command's log lines: one per tool, whoever runs it."""
    if command is not None and command.program:
        return command.program
    return UMBRELLA
