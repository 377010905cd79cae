"""The bounded parser: normalised answer text to a ``Node`` (recursive descent, no ``eval``).

Linear in the input, nesting capped (``max_depth`` brackets, ``_MAX_PARSE_DEPTH`` recursion),
item counts capped; nothing is evaluated except the size check on written exponents.
"""

from __future__ import annotations

from functools import lru_cache

from verifiers.math.latex import (_CONST_CMDS, _CONST_WORDS, _FUNCS, _GREEK, _MUL_CMDS, _REL_CMDS, _Tok,
                                  _tokenize)
from verifiers.math.limits import _MAX_ITEMS, _MAX_PARSE_DEPTH, DEFAULT_MAX_DEPTH
from verifiers.math.nodes import _INF, _ZERO, Node, ParseError, _letter_node, _num, _TooLarge


class _Parser:
    """Recursive descent over the tokens; precedence low to high: list (``,`` ``or``),
    union (``\\cup``), relation (``= < \\le \\in``), sum (``+ - \\pm``), product (``* / \\cdot``
    and implicit), unary sign, power (``^``, right-associative), postfix (``! %``), primary.
    """

    def __init__(self, tokens: list[_Tok]):
        self.toks = tokens
        self.i = 0
        self.depth = 0

    # -- helpers
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def peek(self, k: int = 1) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def at(self, kind: str, *texts: str) -> bool:
        t = self.tok
        return t.kind == kind and (not texts or t.text in texts)

    def expect(self, kind: str, text: str) -> None:
        if not self.at(kind, text):
            raise ParseError(f"expected {text!r}, found {self.tok.text or 'end'!r}")
        self.i += 1

    def enter(self) -> None:
        self.depth += 1
        if self.depth > _MAX_PARSE_DEPTH:
            raise ParseError("nested too deeply")

    # -- grammar
    def parse(self) -> Node:
        while self.at("letters", "either"):
            self.take()
        node = self.parse_list(top=True)
        if not self.at("end"):
            raise ParseError(f"unexpected {self.tok.text!r}")
        return node

    def parse_list(self, top: bool = False) -> Node:
        items = [self.parse_union()]
        joiner = ","
        while True:
            if self.at("op", ",", ";"):
                self.take()
            elif top and self.at("letters", "or", "and"):
                joiner = self.take().text
            else:
                break
            while self.at("letters", "either"):
                self.take()
            if self.at("end"):
                break  # "1, 2, 3," trailing separator
            items.append(self.parse_union())
            if len(items) > _MAX_ITEMS:
                raise ParseError("too many items")
        return items[0] if len(items) == 1 else Node("list", tuple(items), joiner)

    def parse_union(self) -> Node:
        parts = [self.parse_relation()]
        while self.at("cmd", r"\cup") or self.at("letters", "U"):
            self.take()
            parts.append(self.parse_relation())
        return parts[0] if len(parts) == 1 else Node("union", tuple(parts))

    def _relop(self) -> str | None:
        t = self.tok
        if t.kind == "op" and t.text in "=<>":
            nxt = self.peek()
            if t.text in "<>" and nxt.kind == "op" and nxt.text == "=" and not nxt.space:
                return t.text + "="
            return t.text
        if self._not_equal_sign():
            return "!="
        if t.kind == "cmd" and t.text in _REL_CMDS:
            return _REL_CMDS[t.text]
        return None

    def _not_equal_sign(self) -> bool:
        """``!=`` written without a space (``4! = 24`` is a factorial then an equation)."""
        nxt = self.peek()
        return self.at("op", "!") and nxt.kind == "op" and nxt.text == "=" and not nxt.space

    def parse_relation(self) -> Node:
        exprs = [self.parse_sum()]
        ops: list[str] = []
        while (op := self._relop()) is not None:
            if self.take().kind == "op" and len(op) == 2:
                self.take()  # "<=" is two tokens, \le one
            ops.append(op)
            exprs.append(self.parse_sum())
        if not ops:
            return exprs[0]
        if ops == ["in"]:
            return Node("in", (exprs[0], exprs[1]))
        if all(o == "=" for o in ops):
            return Node("eq", (exprs[0], exprs[-1]))  # chains "x = 2+1 = 3" keep the ends
        if "in" in ops or "!=" in ops or "=" in ops:
            raise ParseError("mixed relation")
        return Node("rel", tuple(exprs), tuple(ops))

    def parse_sum(self) -> Node:
        terms = [self.parse_product()]
        pm: Node | None = None
        while True:
            if self.at("op", "+"):
                self.take()
                terms.append(self.parse_product())
            elif self.at("op", "-"):
                self.take()
                terms.append(Node("neg", (self.parse_product(),)))
            elif self.at("cmd", r"\pm", r"\mp"):
                self.take()
                left = terms[0] if len(terms) == 1 else Node("add", tuple(terms))
                right = self.parse_product()
                pm = Node("pm", (left, right))
                terms = [pm]
            else:
                break
            if len(terms) > _MAX_ITEMS:
                raise ParseError("too many terms")
        return terms[0] if len(terms) == 1 else Node("add", tuple(terms))

    def _starts_factor(self) -> bool:
        t = self.tok
        if t.kind in ("letters", "text"):
            return t.text not in ("or", "and", "either", "U")
        if t.kind == "cmd":
            return t.text not in _REL_CMDS and t.text not in _MUL_CMDS and t.text not in (
                r"\pm", r"\mp", r"\cup", r"\}", "\\\\", r"\end", r"\rfloor", r"\rceil")
        return t.kind == "op" and t.text in "({"

    def parse_product(self) -> Node:
        factors = [self.parse_unary()]
        while True:
            if self.at("op", "*", "/") or (self.tok.kind == "cmd" and self.tok.text in _MUL_CMDS):
                op = self.take().text
                rhs = self.parse_unary()
                factors.append(Node("recip", (rhs,)) if op in ("/", r"\div") else rhs)
            elif self._starts_factor():
                factors.append(self.parse_power())
            else:
                break
            if len(factors) > _MAX_ITEMS:
                raise ParseError("too many factors")
        return factors[0] if len(factors) == 1 else Node("mul", tuple(factors))

    def parse_unary(self) -> Node:
        self.enter()
        try:
            if self.at("op", "-"):
                self.take()
                return Node("neg", (self.parse_unary(),))
            if self.at("op", "+"):
                self.take()
                return self.parse_unary()
            if self.at("cmd", r"\pm", r"\mp"):
                self.take()
                return Node("pm", (_ZERO, self.parse_unary()))
            return self.parse_power()
        finally:
            self.depth -= 1

    def parse_power(self) -> Node:
        base = self.parse_postfix()
        if self.at("op", "^"):
            self.take()
            self.enter()
            try:
                exponent = self.parse_script()
            finally:
                self.depth -= 1
            base = Node("pow", (base, exponent))
            base = self.parse_postfix_ops(base)
        return base

    def parse_script(self) -> Node:
        """Argument of ``^``: a braced group, a signed script, or one token (whole numbers:
        plain-text answers write ``2^10`` for 2^{10})."""
        if self.at("op", "-", "+"):
            sign = self.take().text
            inner = self.parse_script()
            return Node("neg", (inner,)) if sign == "-" else inner
        if self.at("op", "{"):
            return self.parse_group()
        if self.at("letters"):
            return self._split_letters()
        return self.parse_power()

    def parse_postfix(self) -> Node:
        return self.parse_postfix_ops(self.parse_primary())

    def parse_postfix_ops(self, node: Node) -> Node:
        while True:
            if self.at("op", "!") and not self._not_equal_sign():
                self.take()
                node = Node("fact", (node,))
            elif self.at("op", "%"):
                self.take()
                node = Node("pct", (node,))
            else:
                return node

    def parse_group(self) -> Node:
        self.expect("op", "{")
        self.enter()
        try:
            node = self.parse_list()
        finally:
            self.depth -= 1
        self.expect("op", "}")
        return node

    def parse_arg(self) -> Node:
        """A LaTeX macro argument: ``{...}`` or one character (``\\frac12``, ``\\sqrt2``)."""
        if self.at("op", "{"):
            return self.parse_group()
        t = self.tok
        if t.kind == "num" and len(t.text) > 1 and t.text.isdigit():
            first, t.text = t.text[0], t.text[1:]
            return _num(first)
        if t.kind == "letters":
            return self._split_letters()
        return self.parse_primary()

    def _split_letters(self) -> Node:
        t = self.tok
        first = t.text[0]
        if len(t.text) == 1:
            self.take()
        else:
            t.text = t.text[1:]
        return _letter_node(first)

    def parse_primary(self) -> Node:
        t = self.tok
        if t.kind == "num":
            return self.parse_number()
        if t.kind == "letters":
            return self.parse_letters()
        if t.kind == "text":
            self.take()
            return Node("word", (), t.text)
        if t.kind == "cmd":
            return self.parse_command()
        if t.kind == "op":
            if t.text == "(" or t.text == "[":
                return self.parse_bracket()
            if t.text == "{":
                return self.parse_group()
            if t.text == "|":
                self.take()
                self.enter()
                try:
                    inner = self.parse_sum()
                finally:
                    self.depth -= 1
                self.expect("op", "|")
                return Node("func", (inner,), "abs")
        raise ParseError(f"unexpected {t.text or 'end'!r}")

    def parse_number(self) -> Node:
        t = self.take()
        node = _num(t.text)
        if t.text.isdigit():
            mixed = self._mixed_fraction()
            if mixed is not None:
                return Node("add", (node, mixed))
            if self.at("op", "_") and (self.peek().kind in ("num", "letters") or self.peek().text == "{"):
                self.take()  # a base subscript, 1011_2: keep the digits as written
                if self.at("op", "{"):
                    self.parse_group()
                else:
                    self.take()
        return node

    def _mixed_fraction(self) -> Node | None:
        """``2\\frac{1}{2}`` or ``2 1/2`` right after an integer: a mixed number (2 + 1/2)."""
        toks, i = self.toks, self.i
        t = toks[i]
        if t.kind == "cmd" and t.text == r"\frac":
            seq = toks[i + 1:i + 7]
            if (len(seq) == 6 and [seq[k].text for k in (0, 2, 3, 5)] == ["{", "}", "{", "}"]
                    and seq[1].kind == "num" and seq[4].kind == "num"
                    and seq[1].text.isdigit() and seq[4].text.isdigit()):
                self.i += 7
                return Node("mul", (_num(seq[1].text), Node("recip", (_num(seq[4].text),))))
            nxt = toks[i + 1]
            if nxt.kind == "num" and len(nxt.text) == 2 and nxt.text.isdigit():  # 2\frac12
                self.i += 2
                return Node("mul", (_num(nxt.text[0]), Node("recip", (_num(nxt.text[1]),))))
            return None
        if (t.kind == "num" and t.space and t.text.isdigit() and toks[i + 1].text == "/"
                and toks[i + 2].kind == "num" and toks[i + 2].text.isdigit()
                and not (toks[i + 3].kind == "op" and toks[i + 3].text in "^/")):
            self.i += 3
            return Node("mul", (_num(t.text), Node("recip", (_num(toks[i + 2].text),))))
        return None

    def parse_letters(self) -> Node:
        t = self.take()
        word = t.text
        if word in ("or", "and", "either", "U"):
            raise ParseError(f"unexpected {word!r}")
        low = word.lower()
        if low in _CONST_WORDS and word.islower():
            return Node("const", (), _CONST_WORDS[low])
        for name in sorted(_FUNCS | {"sqrt"}, key=len, reverse=True):
            if word.startswith(name):
                rest = word[len(name):]
                if rest:
                    self.i -= 1
                    self.toks[self.i] = _Tok("letters", rest, False)
                    self.toks.insert(self.i, _Tok("cmd", "\\" + name, t.space))
                else:
                    self.i -= 1
                    self.toks[self.i] = _Tok("cmd", "\\" + name, t.space)
                return self.parse_command()
        node = _letter_node(word) if len(word) == 1 else Node("letters", (), word)
        return self._subscript(node)

    def _subscript(self, node: Node) -> Node:
        if not self.at("op", "_") or node.kind not in ("sym", "letters", "const"):
            return node
        self.take()
        if self.at("op", "{"):
            start = self.i
            self.parse_group()
            sub = "".join(t.text for t in self.toks[start + 1:self.i - 1])
        else:
            sub = self.take().text
        name = node.value if node.kind != "const" else node.value
        return Node("sym", (), f"{name}_{sub}")

    def parse_command(self) -> Node:
        t = self.take()
        name = t.text
        if name == r"\frac":
            num = self.parse_arg()
            den = self.parse_arg()
            return Node("mul", (num, Node("recip", (den,))))
        if name == r"\binom":
            n = self.parse_arg()
            k = self.parse_arg()
            return Node("func", (n, k), "binom")
        if name == r"\sqrt":
            index = None
            if self.at("op", "["):
                self.take()
                index = self.parse_sum()
                self.expect("op", "]")
            arg = self.parse_arg()
            return Node("func", (arg,) if index is None else (arg, index), "sqrt")
        if name in _CONST_CMDS:
            return Node("const", (), _CONST_CMDS[name])
        if name[1:] in _GREEK:
            return self._subscript(Node("sym", (), name[1:]))
        if name[1:] in _FUNCS:
            return self.parse_function(name[1:])
        if name == r"\{":
            return self.parse_set()
        if name in (r"\emptyset", r"\varnothing"):
            return Node("set", ())
        if name == r"\mathbb":
            self.expect("op", "{")
            letter = self.take().text
            self.expect("op", "}")
            if letter == "R":
                return Node("interval", (Node("neg", (_INF,)), _INF), (True, True))
            return Node("word", (), "mathbb " + letter)
        if name in (r"\lfloor", r"\lceil"):
            inner = self.parse_sum()
            self.expect("cmd", r"\rfloor" if name == r"\lfloor" else r"\rceil")
            return Node("func", (inner,), name[2:])
        if name == r"\begin":
            return self.parse_matrix()
        raise ParseError(f"unsupported command {name}")

    def parse_function(self, fname: str) -> Node:
        power = None
        base = None
        if self.at("op", "_") and fname in ("log", "lg"):
            self.take()
            base = self.parse_group() if self.at("op", "{") else self.parse_primary()
        if self.at("op", "^"):
            self.take()
            power = self.parse_script()
        if self.at("op", "(") or self.at("op", "{"):
            arg = self.parse_primary()
        else:
            # An unbracketed argument that starts with a number runs on to the symbol after it:
            # \sin 2x is sin(2x), \cos 2\theta is cos(2 theta). After a symbol it ends
            # (\sin x e^{x}, \ln|x| C, \sin x \cos x are products).
            factors = [self.parse_power()]
            while all(f.kind == "num" for f in factors) and self._continues_argument():
                factors.append(self.parse_power())
                if len(factors) > _MAX_ITEMS:
                    raise ParseError("too many factors")
            arg = factors[0] if len(factors) == 1 else Node("mul", tuple(factors))
        node = Node("func", (arg,) if base is None else (arg, base), fname)
        return node if power is None else Node("pow", (node, power))

    def _continues_argument(self) -> bool:
        t = self.tok
        if t.kind == "num":
            return True
        if t.kind == "letters":
            return t.text not in ("or", "and", "either", "U") and not t.text.startswith(tuple(_FUNCS))
        return t.kind == "cmd" and (t.text in _CONST_CMDS or t.text[1:] in _GREEK)

    def parse_bracket(self) -> Node:
        opener = self.take().text
        self.enter()
        try:
            items = [self.parse_union()]
            while self.at("op", ","):
                self.take()
                items.append(self.parse_union())
                if len(items) > _MAX_ITEMS:
                    raise ParseError("too many items")
        finally:
            self.depth -= 1
        if not self.at("op", ")", "]"):
            raise ParseError(f"unclosed {opener!r}")
        closer = self.take().text
        if len(items) == 2 and not (opener == "(" and closer == ")"):
            return Node("interval", tuple(items), (opener == "(", closer == ")"))
        if len(items) == 2:
            return Node("tuple", tuple(items), "(")
        if len(items) == 1:
            if opener + closer not in ("()", "[]"):
                raise ParseError("mismatched brackets")
            return Node("paren", (items[0],))
        if opener + closer not in ("()", "[]"):
            raise ParseError("mismatched brackets")
        return Node("tuple", tuple(items), opener)

    def parse_set(self) -> Node:
        self.enter()
        try:
            items: list[Node] = []
            if not self.at("cmd", r"\}"):
                items.append(self.parse_union())
                while self.at("op", ","):
                    self.take()
                    items.append(self.parse_union())
                    if len(items) > _MAX_ITEMS:
                        raise ParseError("too many items")
        finally:
            self.depth -= 1
        self.expect("cmd", r"\}")
        return Node("set", tuple(items))

    def parse_matrix(self) -> Node:
        self.expect("op", "{")
        env = self.take().text
        self.expect("op", "}")
        if env not in ("pmatrix", "bmatrix", "matrix", "Bmatrix", "vmatrix", "smallmatrix", "array"):
            raise ParseError(f"unsupported environment {env}")
        if env == "array" and self.at("op", "{"):
            self.parse_group_raw()
        rows: list[list[Node]] = [[]]
        self.enter()
        try:
            while not self.at("cmd", r"\end"):
                if self.at("end"):
                    raise ParseError("unclosed matrix")
                rows[-1].append(self.parse_sum())
                if self.at("op", "&"):
                    self.take()
                elif self.at("cmd", "\\\\"):
                    self.take()
                    rows.append([])
                if sum(len(r) for r in rows) > _MAX_ITEMS:
                    raise ParseError("matrix too large")
        finally:
            self.depth -= 1
        self.take()
        self.parse_group_raw()
        if not rows[-1]:
            rows.pop()
        if not rows or any(len(r) != len(rows[0]) for r in rows):
            raise ParseError("ragged matrix")
        return Node("matrix", tuple(x for r in rows for x in r), (len(rows), len(rows[0])))

    def parse_group_raw(self) -> None:
        self.expect("op", "{")
        while not self.at("op", "}"):
            if self.at("end"):
                raise ParseError("unclosed {")
            self.take()
        self.take()


def parse(text: str, max_depth: int = DEFAULT_MAX_DEPTH) -> Node:
    """Parse one *normalised* answer (see ``normalize``) into a ``Node``.

    Raises ``ParseError`` for text outside the grammar or nested deeper than ``max_depth``
    brackets. Parsing is linear in the input; nothing is evaluated here except the size
    check on written exponents (``1e99999`` raises ``ParseError`` as too large).
    """
    if _nesting_depth(text) > max_depth:
        raise ParseError(f"brackets nested deeper than {max_depth}")
    return _parse_cached(text)


@lru_cache(maxsize=4096)
def _parse_cached(text: str) -> Node:
    try:
        tokens = _tokenize(text)
    except _TooLarge as exc:
        raise ParseError(f"too large: {exc}") from None
    if len(tokens) == 1:
        raise ParseError("empty answer")
    return _Parser(tokens).parse()


def _nesting_depth(text: str) -> int:
    depth = best = 0
    for c in text:
        if c in "([{":
            depth += 1
            best = max(best, depth)
        elif c in ")]}":
            depth = max(0, depth - 1)
    return best
