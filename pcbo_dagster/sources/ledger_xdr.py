"""A skipping walker for Stellar's ledger XDR: where each value ends, without building it.

XDR has no lengths for its structures, only for its arrays and byte strings, so skipping a value
means knowing its type's layout. The layouts come from the XDR definitions themselves
(`ledger_xdr_definitions`, the text stellar-sdk's generated classes carry), parsed here and compiled
into one Python function per type, `skip(words, i, depth) -> i`, which reads only the words it has
to (array lengths, union discriminants, enum values, "present" flags) and adds the rest up as
constants. A value is walked as 32-bit big-endian words (`xdr_words`), `i` counting words: every XDR
item is a multiple of 4 bytes.

The walker accepts exactly what stellar-sdk's `unpack` accepts (it is tested against it, type by
type): an enum or union discriminant must be one the definitions name, array and byte-string
lengths within their bounds, a union arm must exist; a nonzero "present" flag of an optional is
present and any boolean value is taken (as stellar-sdk does); padding bytes are not checked; and
the nesting limit is stellar-sdk's (`DEFAULT_XDR_MAX_DEPTH`, 512, one level per generated class).
Reading past the end shows as an `IndexError`, or, for values skipped without reading, as an end
index beyond the words: callers check `i <= len(words)` once a value is done.
"""

from __future__ import annotations

import array
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

#: stellar-sdk's nesting limit for decoding (`stellar_sdk.xdr.base.DEFAULT_XDR_MAX_DEPTH`).
MAX_DEPTH = 512
_UNBOUNDED = 0xFFFFFFFF
_PRIMITIVE_WORDS = {
    "int": 1,
    "unsigned int": 1,
    "bool": 1,
    "float": 1,
    "hyper": 2,
    "unsigned hyper": 2,
    "double": 2,
}

Skipper = Callable[[Any, int, int], int]


class XdrError(ValueError):
    """XDR that stellar-sdk would not decode either (other than running out of bytes)."""


def xdr_words(data: bytes) -> array.array:
    """The whole 32-bit words of `data`, as unsigned integers (XDR is big-endian)."""
    words = array.array("I")
    assert words.itemsize == 4
    words.frombytes(memoryview(data)[: len(data) // 4 * 4])
    if sys.byteorder == "little":
        words.byteswap()
    return words


# -- the definitions, parsed ------------------------------------------------------------------------


@dataclass
class Decl:
    """A field, union arm or typedef: `kind` is a primitive ("int", "unsigned hyper", ...),
    "opaque", "string", the name of a type, or an anonymous struct or union (`Node`)."""

    kind: str | Node
    mode: str = "one"  # "one", "fixed" ([n]), "var" (<n>) or "optional" (*)
    size: int = 0  # n of [n] or <n> (<> is 2**32 - 1)


@dataclass
class Node:
    """A struct, union, enum or typedef: what stellar-sdk makes a class of."""

    name: str
    kind: str  # "struct", "union", "enum" or "typedef"
    fields: list[Decl] = field(default_factory=list)  # struct; typedef: [the declaration]
    values: dict[str, int] = field(default_factory=dict)  # enum members
    discriminant: Decl | None = None  # union
    arms: list[tuple[list[int | str], Decl | None]] = field(default_factory=list)  # union; None: void
    default: Decl | None | bool = False  # union: False when there is no default arm


_TOKEN = re.compile(
    r"\s+|//[^\n]*|/\*.*?\*/|([A-Za-z_][A-Za-z0-9_]*|-?0[xX][0-9A-Fa-f]+|-?[0-9]+|[{}()\[\]<>;:=,*])", re.S
)


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"XDR definitions: cannot read {text[pos : pos + 30]!r}")
        if match.group(1):
            out.append(match.group(1))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.pos = 0
        self.types: dict[str, Node] = {}
        self.constants: dict[str, int] = {  # a constant may be used before its definition
            self.tokens[k + 1]: int(self.tokens[k + 3], 0)
            for k, token in enumerate(self.tokens)
            if token == "const"
        }

    def peek(self) -> str:
        return self.tokens[self.pos]

    def take(self, expected: str | None = None) -> str:
        token = self.tokens[self.pos]
        if expected is not None and token != expected:
            raise ValueError(f"XDR definitions: expected {expected!r}, found {token!r} (token {self.pos})")
        self.pos += 1
        return token

    def number(self) -> int:
        token = self.take()
        if token in self.constants:
            return self.constants[token]
        return int(token, 0)

    def parse(self) -> tuple[dict[str, Node], dict[str, int]]:
        while self.pos < len(self.tokens):
            word = self.take()
            if word == "const":
                name = self.take()
                self.take("=")
                self.constants[name] = self.number()
                self.take(";")
            elif word == "typedef":
                decl, name = self.declaration()
                self.types[name] = Node(name, "typedef", fields=[decl])
                self.take(";")
            elif word in ("struct", "union", "enum"):
                name = self.take()
                self.types[name] = self.body(word, name)
                self.take(";")
            else:
                raise ValueError(f"XDR definitions: unexpected {word!r}")
        members = {m: v for node in self.types.values() for m, v in node.values.items() if isinstance(v, int)}
        for node in self.types.values():
            for member, value in node.values.items():
                if isinstance(value, str):
                    node.values[member] = members[value]
        return self.types, self.constants

    def body(self, kind: str, name: str) -> Node:
        node = Node(name, kind)
        if kind == "enum":
            self.take("{")
            while True:
                member = self.take()
                self.take("=")
                token = self.take()  # a number, or a member of an enum (perhaps one defined later)
                node.values[member] = int(token, 0) if token[0] in "-0123456789" else token  # type: ignore[assignment]
                if self.take() == "}":
                    return node
        if kind == "struct":
            self.take("{")
            while self.peek() != "}":
                decl, _ = self.declaration()
                node.fields.append(decl)
                self.take(";")
            self.take("}")
            return node
        self.take("switch")
        self.take("(")
        node.discriminant, _ = self.declaration()
        self.take(")")
        self.take("{")
        labels: list[int | str] = []
        while self.peek() != "}":
            word = self.take()
            if word == "case":
                token = self.take()
                labels.append(int(token, 0) if token[0] in "-0123456789" else token)
                self.take(":")
                continue
            if word == "default":
                self.take(":")
            else:
                self.pos -= 1
            arm: Decl | None = None
            if self.peek() == "void":
                self.take()
            else:
                arm, _ = self.declaration()
            self.take(";")
            if word == "default":
                node.default = arm
            else:
                node.arms.append((labels, arm))
            labels = []
        self.take("}")
        return node

    def declaration(self) -> tuple[Decl, str]:
        word = self.take()
        kind: str | Node
        if word == "unsigned":
            kind = "unsigned " + self.take()
        elif word in ("struct", "union"):
            kind = self.body(word, "")
        else:
            kind = word
        if self.peek() == "*":
            self.take()
            return Decl(kind, "optional"), self.take()
        name = self.take()
        if self.peek() == "[":
            self.take()
            decl = Decl(kind, "fixed", self.number())
            self.take("]")
        elif self.peek() == "<":
            self.take()
            decl = Decl(kind, "var", _UNBOUNDED if self.peek() == ">" else self.number())
            self.take(">")
        else:
            decl = Decl(kind)
        return decl, name


def parse_definitions(text: str) -> dict[str, Node]:
    """The named types of XDR definition text (struct, union, enum, typedef and const)."""
    types, _ = _Parser(text).parse()
    return types


# -- the compiler -----------------------------------------------------------------------------------


class _Compiler:
    """Writes one skip function per struct, union and typedef whose size is not a constant."""

    def __init__(self, types: dict[str, Node], observed: frozenset[str] = frozenset()) -> None:
        self.types = types
        self.observed = observed
        self.observed_index = {name: k for k, name in enumerate(sorted(observed))}  # in `seen`
        self.carriers = self._carriers()
        self.inlined: set[str] = set()  # small types written in place instead of called
        self.lines: list[str] = []
        self.names: dict[str, object] = {"XdrError": XdrError, "_depth": _depth_error}
        self.counter = 0
        self._fixed: dict[int, tuple[int, int] | None] = {}

    def _carriers(self) -> set[str]:
        """The named types whose values may hold an observed type's: their functions take `seen`."""

        def named_parts(kind: str | Node | None) -> set[str]:
            node = kind if isinstance(kind, Node) else None
            if node is None:
                return {kind} if isinstance(kind, str) and kind in self.types else set()
            decls = node.fields + [d for _, d in node.arms if d is not None]
            if isinstance(node.default, Decl):
                decls.append(node.default)
            return set().union(*(named_parts(d.kind) for d in decls)) if decls else set()

        parts = {name: named_parts(node) for name, node in self.types.items()}
        self.recursive = {name for name in parts if name in _closure(name, parts)}
        carriers: set[str] = set()
        while True:
            more = {n for n, p in parts.items() if n not in carriers and p & (self.observed | carriers)}
            if not more:
                return carriers
            carriers |= more

    # What a type is: a constant size (words, and the deepest class level inside), or read.

    def node_of(self, kind: str | Node) -> Node | None:
        if isinstance(kind, Node):
            return kind
        return self.types.get(kind)

    def fixed_node(self, node: Node) -> tuple[int, int] | None:
        """(words, deepest class level below it) of a node of constant size; None if it must be read."""
        key = id(node)
        if key in self._fixed:
            return self._fixed[key]
        self._fixed[key] = None  # a recursive type is never of constant size
        result: tuple[int, int] | None = None
        if node.kind in ("struct", "typedef"):
            words = deepest = 0
            for decl in node.fields:
                fixed = self.fixed_decl(decl)
                if fixed is None:
                    break
                words += fixed[0]
                deepest = max(deepest, fixed[1])
            else:
                result = (words, deepest)
        self._fixed[key] = result
        return result

    def fixed_decl(self, decl: Decl) -> tuple[int, int] | None:
        """(words, deepest class level, counting its own type as 1) of a declaration of constant size."""
        if decl.mode in ("var", "optional"):
            return None
        count = decl.size if decl.mode == "fixed" else 1
        if decl.kind == "opaque":
            return ((count + 3) // 4, 0)
        if decl.kind == "string":
            return None
        if isinstance(decl.kind, str) and decl.kind in _PRIMITIVE_WORDS:
            return (count * _PRIMITIVE_WORDS[decl.kind], 0)
        node = self.node_of(decl.kind)
        if node is None:
            raise ValueError(f"XDR definitions: unknown type {decl.kind!r}")
        if node.kind == "enum":
            return None
        fixed = self.fixed_node(node)
        if fixed is None:
            return None
        return (count * fixed[0], fixed[1] + 1 if count else 0)

    def enum_values(self, node: Node) -> frozenset[int]:
        return frozenset(v & 0xFFFFFFFF for v in node.values.values())

    def constant(self, value: object, stem: str) -> str:
        self.counter += 1
        name = f"_{stem}{self.counter}"
        self.names[name] = value
        return name

    # Code. `level` is how many classes below the function's own the code being written is (the
    # function's type is level 0: stellar-sdk calls its fields' classes with depth - 1).

    def function(self, node: Node) -> None:
        self.body: list[str] = []
        self.entry_level = 0
        self.proven = 0  # on the path being written, d > proven is known (checked already)
        self.pending = 0
        self.node(node, 0, 1, conditional=False)
        self.flush(1)
        seen = ", seen" if node.name in self.carriers else ""
        head = [f"def skip_{node.name}(w, i, d{seen}):"]
        head.append(f"    if d <= {self.entry_level}: _depth()")
        self.lines += head + self.body + ["    return i", ""]

    def emit(self, indent: int, line: str) -> None:
        self.body.append("    " * indent + line)

    def flush(self, indent: int) -> None:
        if self.pending:
            self.emit(indent, f"i += {self.pending}")
            self.pending = 0

    def require(self, level: int, indent: int, conditional: bool) -> None:
        """stellar-sdk refuses a class at depth <= 0: one `level` classes below needs d > level."""
        if conditional:
            if level > max(self.proven, self.entry_level):
                self.emit(indent, f"if d <= {level}: _depth()")
                self.proven = level
        else:
            self.entry_level = max(self.entry_level, level)

    def node(self, node: Node, level: int, indent: int, conditional: bool) -> None:
        """The code of one value of `node` (a class `level` levels below the function's)."""
        self.require(level, indent, conditional)
        if node.kind in ("struct", "typedef"):
            for decl in node.fields:
                self.decl(decl, level, indent, conditional)
            return
        assert node.kind == "union" and node.discriminant is not None
        discriminant = self.node_of(node.discriminant.kind)
        enum = discriminant if discriminant is not None and discriminant.kind == "enum" else None
        groups: dict[str, list[int]] = {}
        arms: dict[str, Decl | None] = {}
        for labels, arm in node.arms:
            for label in labels:
                value = enum.values[label] if enum is not None and isinstance(label, str) else label
                assert isinstance(value, int)
                key = repr(arm)
                groups.setdefault(key, []).append(value & 0xFFFFFFFF)
                arms[key] = arm
        sizes = {(0, 0) if d is None else self.fixed_decl(d) for d in arms.values()}
        if node.default is False and len(sizes) == 1 and None not in sizes:
            # Every arm is void or of one constant size (an `ext` union, a result code, a key type):
            # check the discriminant in place and skip the arm, without a branch.
            ((words, deepest),) = sizes  # type: ignore[misc]
            valid = sorted(v for values in groups.values() for v in values)
            where = f"w[i + {self.pending}]"
            test = (
                f"{where} != {valid[0]}"
                if len(valid) == 1
                else f"{where} not in {self.constant(frozenset(valid), 'arm')}"
            )
            self.emit(
                indent, f"if {test}: raise XdrError('{node.name or 'union'}: discriminant %d' % {where})"
            )
            if deepest:
                self.require(level + deepest, indent, conditional)
            self.pending += 1 + words
            return
        self.flush(indent)
        self.emit(indent, "t = w[i]")
        self.emit(indent, "i += 1")
        invalid = f"raise XdrError('{node.name or 'union'}: discriminant %d' % t)"
        if len(groups) > TREE_ARMS and node.default is False:
            by_value = sorted((v, key) for key, values in groups.items() for v in values)
            self.tree([(v, arms[key]) for v, key in by_value], level, indent, invalid)
            return
        first = True
        for key, values in groups.items():
            test = (
                f"t == {values[0]}" if len(values) == 1 else f"t in {self.constant(frozenset(values), 'arm')}"
            )
            self.emit(indent, f"{'if' if first else 'elif'} {test}:")
            first = False
            self.arm(arms[key], level, indent + 1)
        if node.default is not False:
            if enum is not None:  # stellar-sdk reads the discriminant as its enum first
                others = self.enum_values(enum) - {v for values in groups.values() for v in values}
                self.emit(indent, f"elif t in {self.constant(frozenset(others), 'arm')}:")
            else:
                self.emit(indent, "else:")
            self.arm(node.default if isinstance(node.default, Decl) else None, level, indent + 1)
            if enum is not None:
                self.emit(indent, f"else: {invalid}")
        else:
            self.emit(indent, f"else: {invalid}")

    def tree(self, arms: list[tuple[int, Decl | None]], level: int, indent: int, invalid: str) -> None:
        """Arms chosen by halving the sorted discriminants (a few comparisons, not one per arm)."""
        if len(arms) <= 3:
            for k, (value, decl) in enumerate(arms):
                self.emit(indent, f"{'elif' if k else 'if'} t == {value}:")
                self.arm(decl, level, indent + 1)
            self.emit(indent, f"else: {invalid}")
            return
        middle = len(arms) // 2
        self.emit(indent, f"if t < {arms[middle][0]}:")
        self.tree(arms[:middle], level, indent + 1, invalid)
        self.emit(indent, "else:")
        self.tree(arms[middle:], level, indent + 1, invalid)

    def arm(self, decl: Decl | None, level: int, indent: int) -> None:
        if decl is None:
            self.emit(indent, "pass")
            return
        proven = self.proven  # what a branch checks is not known after it
        self.decl(decl, level, indent, conditional=True)
        self.flush(indent)
        self.proven = proven

    def decl(self, decl: Decl, level: int, indent: int, conditional: bool) -> None:
        """The code of a declaration held by a class `level` levels below the function's."""
        fixed = self.fixed_decl(decl)
        if fixed is not None:
            words, deepest = fixed
            if deepest:
                self.require(level + deepest, indent, conditional)
            self.pending += words
            return
        if decl.kind in ("opaque", "string"):
            self.flush(indent)
            self.emit(indent, "n = w[i]")
            if decl.size != _UNBOUNDED:
                self.emit(indent, f"if n > {decl.size}: raise XdrError('{decl.kind} of %d bytes' % n)")
            self.emit(indent, "i += 1 + ((n + 3) >> 2)")
            return
        node = self.node_of(decl.kind)
        assert node is not None
        if decl.mode == "one":
            self.one(node, level + 1, indent, conditional)
            return
        self.flush(indent)
        if decl.mode == "optional":
            self.emit(indent, "i += 1")
            self.emit(indent, "if w[i - 1]:")
            proven = self.proven
            self.one(node, level + 1, indent + 1, conditional=True)
            self.flush(indent + 1)
            self.proven = proven
            return
        if decl.mode == "var":
            self.counter += 1
            count = f"n{self.counter}"
            self.emit(indent, f"{count} = w[i]")
            self.emit(indent, "i += 1")
            if decl.size != _UNBOUNDED:
                self.emit(
                    indent,
                    f"if {count} > {decl.size}: raise XdrError('{node.name}<{decl.size}>: %d' % {count})",
                )
        else:
            count = str(decl.size)
        element = self.fixed_decl(Decl(decl.kind))
        if element is not None:  # a run of constant-size values
            words, deepest = element
            self.emit(indent, f"if {count}:")
            proven = self.proven
            self.require(level + deepest, indent + 1, conditional=True)
            self.proven = proven
            self.emit(indent + 1, f"i += {count} * {words}")
            return
        if node.kind == "enum":
            valid = self.constant(self.enum_values(node), "enum")
            self.emit(indent, f"if not {valid}.issuperset(w[i : i + {count}]): raise XdrError('{node.name}')")
            self.emit(indent, f"i += {count}")
            return
        self.emit(indent, f"for _ in range({count}):")
        proven = self.proven
        self.one(node, level + 1, indent + 1, conditional=True)
        self.flush(indent + 1)
        self.proven = proven

    def one(self, node: Node, level: int, indent: int, conditional: bool) -> None:
        """One value of `node`, a class at `level`: an enum checked, an anonymous type written in
        place, a named type skipped by its function."""
        if node.kind == "enum":
            valid = self.constant(self.enum_values(node), "enum")
            self.emit(indent, f"if w[i + {self.pending}] not in {valid}: raise XdrError('{node.name}')")
            self.pending += 1
            return
        fixed = self.fixed_node(node)
        if fixed is not None:
            words, deepest = fixed
            self.require(level + deepest, indent, conditional)
            self.pending += words
            return
        if not node.name or node.name in self.inlined:
            self.node(node, level, indent, conditional)
            return
        self.flush(indent)
        seen = ", seen" if node.name in self.carriers else ""
        call = f"i = skip_{node.name}(w, i, d - {level}{seen})"
        if node.name in self.observed:  # where the value starts and where it ends
            bounds = f"seen[{self.observed_index[node.name]}]"
            self.emit(indent, f"{bounds}.append(i)")
            self.emit(indent, call)
            self.emit(indent, f"{bounds}.append(i)")
        else:
            self.emit(indent, call)


def _closure(name: str, parts: dict[str, set[str]]) -> set[str]:
    """The named types a value of `name` may hold, at any depth (itself only if it is recursive)."""
    found: set[str] = set()
    todo = list(parts[name])
    while todo:
        part = todo.pop()
        if part not in found:
            found.add(part)
            todo.extend(parts[part])
    return found


#: Unions of more arms than this choose theirs by halving (`_Compiler.tree`).
TREE_ARMS = 6

#: Types whose own code is at most this many lines are written in place where they are used (a
#: Python call costs more than the few lines it would run).
INLINE_LINES = 12


def _depth_error() -> None:
    raise XdrError("Maximum decoding depth reached")


class Walker:
    """Skip functions by type name (`skipper`), the words of the types of constant size, and the
    source of the functions compiled. The functions of the types in `carriers` take a fourth
    argument, `seen`: a list for each observed type (`observed`, in name order; `observations()`
    makes one), to which the word indices where each value of that type they pass starts and ends are
    appended (start, end, start, end, ...). A small type is written in place where it is used; its
    own function is compiled when asked for."""

    def __init__(self, compiler: _Compiler, namespace: dict[str, Any], source: str) -> None:
        self._compiler = compiler
        self._namespace = namespace
        self._lock = threading.Lock()
        self.source = source
        self.carriers = frozenset(compiler.carriers)
        self.observed = tuple(sorted(compiler.observed))
        self.fixed_words: dict[str, int] = {}
        self._skippers: dict[str, Callable[..., int]] = {}
        for name, node in compiler.types.items():
            if node.kind == "enum":
                self._skippers[name] = _enum_skipper(compiler.enum_values(node), name)
            elif (fixed := compiler.fixed_node(node)) is not None:
                self.fixed_words[name] = fixed[0]
                self._skippers[name] = _constant_skipper(*fixed)
            elif f"skip_{name}" in namespace:
                self._skippers[name] = namespace[f"skip_{name}"]

    @property
    def names(self) -> set[str]:
        return set(self._compiler.types)

    def observations(self) -> tuple[list[int], ...]:
        """A fresh `seen` argument: an empty list for each observed type."""
        return tuple([] for _ in self.observed)

    def skipper(self, name: str) -> Callable[..., int]:
        """The skip function of `name`: `(words, i, depth[, seen]) -> end` (`seen`: `observations()`)."""
        found = self._skippers.get(name)
        if found is None:
            with self._lock:
                compiler = self._compiler
                compiler.lines = []
                compiler.function(compiler.types[name])
                source = "\n".join(compiler.lines)
                self._namespace.update(compiler.names)  # the constants its code names
                exec(compile(source, f"<ledger_xdr {name}>", "exec"), self._namespace)  # noqa: S102
                found = self._skippers[name] = self._namespace[f"skip_{name}"]
        return found

    def skip(self, name: str, words: Any, i: int, depth: int = MAX_DEPTH) -> int:
        """The word index where the `name` value at `i` ends (entered at stellar-sdk's `depth`)."""
        if name in self.carriers:
            return self.skipper(name)(words, i, depth, self.observations())
        return self.skipper(name)(words, i, depth)


def compile_walker(text: str, observed: frozenset[str] = frozenset()) -> Walker:
    """Skip functions for every type of the definitions `text`; the functions of types that may hold
    an `observed` type note where each of its values starts and ends."""
    types = parse_definitions(text)
    compiler = _Compiler(types, observed)
    small = []
    for name, node in types.items():  # a first pass, to measure each type's own code
        if node.kind != "enum" and compiler.fixed_node(node) is None:
            before = len(compiler.lines)
            compiler.function(node)
            if len(compiler.lines) - before - 3 <= INLINE_LINES and name not in compiler.recursive:
                small.append(name)
    compiler.lines = []
    compiler.inlined = {n for n in small if n not in compiler.carriers and n not in observed}
    for name in sorted(types):  # the functions the others call (a small type's when asked for)
        node = types[name]
        if node.kind != "enum" and compiler.fixed_node(node) is None and name not in compiler.inlined:
            compiler.function(node)
    source = "\n".join(compiler.lines)
    namespace = dict(compiler.names)
    exec(compile(source, "<ledger_xdr>", "exec"), namespace)  # noqa: S102 - compiled from the definitions
    return Walker(compiler, namespace, source)


def _constant_skipper(words: int, deepest: int) -> Skipper:
    def skip(w: Any, i: int, d: int) -> int:
        if d <= deepest:
            _depth_error()
        return i + words

    return skip


def _enum_skipper(valid: frozenset[int], name: str) -> Skipper:
    def skip(w: Any, i: int, d: int) -> int:
        if w[i] not in valid:
            raise XdrError(name)
        return i + 1

    return skip


#: The types whose values `walk_ledger` notes (in name order, as `seen` holds them), each found in
#: one place of a LedgerCloseMeta: its transaction set (a GeneralizedTransactionSet in v1 and v2, a
#: TransactionSet in v0), the set's envelopes, and its results (the TransactionResultPair of each
#: entry of `txProcessing`).
_OBSERVED = ("GeneralizedTransactionSet", "TransactionEnvelope", "TransactionResultPair", "TransactionSet")


@cache
def stellar_walker() -> Walker:
    """The walker of Stellar's ledger XDR (compiled once per process, on first use)."""
    from pcbo_dagster.sources.ledger_xdr_definitions import DEFINITIONS

    walker = compile_walker(DEFINITIONS, observed=frozenset(_OBSERVED))
    assert walker.observed == _OBSERVED
    return walker


# -- a LedgerCloseMeta, walked for what a ledger's record needs -------------------------------------


@dataclass(frozen=True)
class LedgerFacts:
    """What one walk of a LedgerCloseMeta (v0, v1 or v2) finds; positions are word indices."""

    version: int
    start: int  # the LedgerCloseMeta's words are [start, end)
    end: int
    header_start: int  # its LedgerHeader's words are [header_start, header_end); its hash the 8 before
    header_end: int
    tx_set_start: int  # its (Generalized)TransactionSet's words are [tx_set_start, tx_set_end)
    tx_set_end: int
    result_hash_start: int  # its header's txSetResultHash is the 8 words from here
    results: list[int]  # where the result (TransactionResultPair) of each entry of its txProcessing
    # starts and ends, in their order: [start, end, start, end, ...]
    sequence: int
    close_time: int
    protocol: int
    transaction_count: int  # the envelopes of its transaction set
    operation_count: int  # their operations (a fee bump's: its inner transaction's)


def walk_ledger(words: Any, i: int) -> LedgerFacts:
    """Walk the LedgerCloseMeta at `i`, checking all of it as stellar-sdk's `unpack` would (entered at
    its top depth, as `LedgerCloseMeta.unpack` is). Raises `XdrError` or `IndexError`; a value ending
    beyond the words raises `EOFError`."""
    skippers = _ledger_skippers()
    seen: tuple[list[int], ...] = ([], [], [], [])
    generalized_set, envelope_bounds, results, legacy_set = seen
    end = skippers["LedgerCloseMeta"](words, i, MAX_DEPTH, seen)
    if end > len(words):
        raise EOFError
    tx_set, tx_set_end = legacy_set or generalized_set  # one of them, walked once
    version = words[i]
    entry = i + 1 if version == 0 else skippers["LedgerCloseMetaExt"](words, i + 1, MAX_DEPTH)
    header = entry + 8  # LedgerHeaderHistoryEntry {Hash hash; LedgerHeader header; ...}
    # LedgerHeader {uint32 ledgerVersion; Hash previousLedgerHash; StellarValue scpValue; Hash
    # txSetResultHash; Hash bucketListHash; uint32 ledgerSeq; ...}; StellarValue {Hash txSetHash;
    # TimePoint closeTime; ...}
    after_scp_value = skippers["StellarValue"](words, header + 9, MAX_DEPTH)
    header_end = tx_set - 1  # before the entry's ext (union switch (int v) {case 0: void;})
    return LedgerFacts(
        version=version,
        start=i,
        end=end,
        header_start=header,
        header_end=header_end,
        tx_set_start=tx_set,
        tx_set_end=tx_set_end,
        result_hash_start=after_scp_value,
        results=results,
        sequence=words[after_scp_value + 16],
        close_time=words[header + 17] << 32 | words[header + 18],
        protocol=words[header],
        transaction_count=len(envelope_bounds) // 2,
        operation_count=sum(_operations(words, e, skippers) for e in envelope_bounds[::2]),
    )


_ENVELOPE_TX_V0, _ENVELOPE_TX, _ENVELOPE_TX_FEE_BUMP = 0, 2, 5


@cache
def _ledger_skippers() -> dict[str, Callable[..., int]]:
    walker = stellar_walker()
    names = ("LedgerCloseMeta", "LedgerCloseMetaExt", "StellarValue", "MuxedAccount", "Preconditions", "Memo")
    return {name: walker.skipper(name) for name in names}


def _operations(words: Any, i: int, skippers: dict[str, Callable[..., int]]) -> int:
    """The operation count of the (already checked) TransactionEnvelope at `i`."""
    kind = words[i]
    if kind == _ENVELOPE_TX_V0:  # TransactionV0 {uint256 source; uint32 fee; SequenceNumber seqNum;
        i += 12  # TimeBounds* timeBounds; Memo memo; Operation operations<100>; ...}
        i += 5 if words[i] else 1
        return words[skippers["Memo"](words, i, MAX_DEPTH)]
    if kind == _ENVELOPE_TX_FEE_BUMP:  # FeeBumpTransaction {MuxedAccount feeSource; int64 fee;
        i = skippers["MuxedAccount"](words, i + 1, MAX_DEPTH) + 2  # union {ENVELOPE_TYPE_TX: ...} innerTx
    # Transaction {MuxedAccount source; uint32 fee; SequenceNumber seqNum; Preconditions cond; Memo memo;
    # Operation operations<100>; ...}
    i = skippers["MuxedAccount"](words, i + 1, MAX_DEPTH) + 3
    i = skippers["Preconditions"](words, i, MAX_DEPTH)
    return words[skippers["Memo"](words, i, MAX_DEPTH)]
