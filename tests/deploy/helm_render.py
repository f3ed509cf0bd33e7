#!/usr/bin/env python3
"""A small Go-template renderer for the Ablate chart, for machines without helm (Debian has no package).

    helm_render.py CHART_DIR [-f values.yaml ...] [--release NAME] [--namespace NS]   -> manifests on stdout

It implements the subset of Go templates + Sprig that helm/ablate uses: actions with {{- -}} trimming, comments,
if/else if/else, range (lists and maps, with $i/$k, $v), with, define/include/template, variables (:= and =),
pipelines, parentheses, and the functions listed in FUNCS. A template using anything else fails loudly here, so
the chart stays within what this renderer (and helm) both understand; where helm exists tests/deploy renders with
both and compares the results. Map iteration is in sorted key order and toYaml sorts keys, as in helm.
"""
import argparse
import copy
import json
import os
import re
import sys

import yaml


class TemplateError(Exception):
    pass


# ------------------------------------------------------------------------------------------------ lexing / parsing

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def tokenize(src, name):
    """Text and action tokens, with trim markers applied to the neighbouring text."""
    toks, pos = [], 0
    for m in ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        toks.append(("text", text))
        body = m.group(2).strip()
        toks.append(("action", body, bool(m.group(3))))
        pos = m.end()
    toks.append(("text", src[pos:]))
    # right trim: strip leading whitespace of the text after an action ending in " -}}"
    out = []
    trim_next = False
    for t in toks:
        if t[0] == "text":
            out.append(("text", t[1].lstrip(" \t\r\n") if trim_next else t[1]))
            trim_next = False
        else:
            out.append(("action", t[1]))
            trim_next = t[2]
    return out


class Node:
    def __init__(self, kind, **kw):
        self.kind = kind
        self.__dict__.update(kw)


def parse(tokens, name, defines):
    pos = 0

    def block(stop):
        nonlocal pos
        nodes = []
        while pos < len(tokens):
            t = tokens[pos]
            if t[0] == "text":
                if t[1]:
                    nodes.append(Node("text", text=t[1]))
                pos += 1
                continue
            body = t[1]
            if body.startswith("/*"):
                pos += 1
                continue
            word = body.split(None, 1)[0] if body else ""
            if word in stop:
                return nodes, word, body
            pos += 1
            if word == "if":
                nodes.append(parse_if(body[2:].strip()))
            elif word in ("range", "with"):
                arg = body[len(word):].strip()
                inner, end, _ = block(("end", "else"))
                els = None
                if end == "else":
                    pos += 1
                    els, end, _ = block(("end",))
                pos += 1
                nodes.append(Node(word, arg=arg, body=inner, els=els))
            elif word == "define":
                tname = parse_string(body[6:].strip())
                inner, _, _ = block(("end",))
                pos += 1
                defines[tname] = inner
            elif word in ("template",):
                rest = body[len(word):].strip()
                m = re.match(r'"([^"]*)"\s*(.*)', rest)
                nodes.append(Node("action", expr='include "%s" %s' % (m.group(1), m.group(2) or "."), text=body))
            elif word in ("end", "else"):
                raise TemplateError("%s: unexpected {{%s}}" % (name, body))
            else:
                nodes.append(Node("action", expr=body))
        if stop != ("<eof>",):
            raise TemplateError("%s: missing {{end}}" % name)
        return nodes, None, None

    def parse_if(cond):
        nonlocal pos
        inner, end, body = block(("end", "else"))
        els = None
        if end == "else":
            rest = body[4:].strip()
            pos += 1
            if rest.startswith("if "):
                els = [parse_if(rest[3:].strip())]
                return Node("if", cond=cond, body=inner, els=els)
            els, end, _ = block(("end",))
        pos += 1
        return Node("if", cond=cond, body=inner, els=els)

    nodes, _, _ = block(("<eof>",))
    return nodes


def parse_string(s):
    s = s.strip()
    if s.startswith('"'):
        return json.loads(s)
    if s.startswith("`"):
        return s[1:-1]
    raise TemplateError("expected a string, got %r" % s)


# ------------------------------------------------------------------------------------------------ expressions

TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)|(?P<num>-?\d+(?:\.\d+)?)|(?P<op>:=|=|\||\(|\)|,)'
                   r'|(?P<word>[$.\w][\w.$\[\]\'-]*))')


def lex_expr(s):
    out, pos = [], 0
    s = s.strip()
    while pos < len(s):
        m = TOKEN.match(s, pos)
        if not m or m.end() == pos:
            raise TemplateError("cannot parse %r at %r" % (s, s[pos:]))
        spaced = m.start(m.lastgroup) > pos
        pos = m.end()
        if m.lastgroup == "word" and not spaced and out and out[-1] == ("op", ")"):
            out.append(("field", m.group("word")))  # (pipeline).Field
        else:
            out.append((m.lastgroup, m.group(m.lastgroup)))
    return out


class Ctx:
    def __init__(self, renderer, dot, variables):
        self.r, self.dot, self.vars = renderer, dot, variables


def truthy(v):
    if v is None or v is False:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if isinstance(v, (str, list, dict, tuple)):
        return len(v) > 0
    return True


def field(v, path, expr):
    for p in path:
        if p == "":
            continue
        if isinstance(v, dict):
            v = v.get(p)
        elif v is None:
            return None
        else:
            raise TemplateError("%s: cannot take field %s of %r" % (expr, p, type(v).__name__))
    return v


def to_str(v):
    if v is None:
        return ""
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (dict, list)):
        raise TemplateError("printing a map/list directly; use toYaml")
    return str(v)


def to_yaml(v):
    if v is None:
        return "null"
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True, width=1 << 20).rstrip("\n")


def indent(n, s):
    pad = " " * int(n)
    return "\n".join(pad + line for line in str(s).split("\n"))


def go_printf(fmt, *args):
    out, i, ai = [], 0, 0
    while i < len(fmt):
        c = fmt[i]
        if c == "%" and i + 1 < len(fmt):
            verb = fmt[i + 1]
            i += 2
            if verb == "%":
                out.append("%")
                continue
            a = args[ai]
            ai += 1
            if verb in ("s", "v"):
                out.append(to_str(a))
            elif verb == "d":
                out.append(str(int(a)))
            elif verb == "q":
                out.append(json.dumps(to_str(a)))
            else:
                raise TemplateError("printf verb %%%s not supported" % verb)
            continue
        out.append(c)
        i += 1
    return "".join(out)


def fn_required(msg, v):
    if v is None or v == "":
        raise TemplateError("required: " + msg)
    return v


def fn_set(d, k, v):
    d[k] = v
    return d


FUNCS = {
    "quote": lambda *a: " ".join(json.dumps(to_str(x)) for x in a),
    "squote": lambda *a: " ".join("'%s'" % to_str(x) for x in a),
    "default": lambda d, v=None: v if truthy(v) else d,
    "required": fn_required,
    "toYaml": to_yaml,
    "toJson": lambda v: json.dumps(v, sort_keys=True, separators=(",", ":")),
    "nindent": lambda n, s: "\n" + indent(n, s),
    "indent": indent,
    "printf": go_printf,
    "trunc": lambda n, s: s[:int(n)] if int(n) >= 0 else s[int(n):],
    "trimSuffix": lambda suf, s: s[:-len(suf)] if suf and s.endswith(suf) else s,
    "trimPrefix": lambda pre, s: s[len(pre):] if pre and s.startswith(pre) else s,
    "trim": lambda s: s.strip(),
    "replace": lambda old, new, s: s.replace(old, new),
    "contains": lambda sub, s: sub in s,
    "lower": lambda s: s.lower(),
    "upper": lambda s: s.upper(),
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "not": lambda v: not truthy(v),
    "and": lambda *a: next((x for x in a if not truthy(x)), a[-1]),
    "or": lambda *a: next((x for x in a if truthy(x)), a[-1]),
    "list": lambda *a: list(a),
    "dict": lambda *a: {a[i]: a[i + 1] for i in range(0, len(a), 2)},
    "set": fn_set,
    "hasKey": lambda d, k: k in d,
    "empty": lambda v: not truthy(v),
    "int": lambda v: int(v),
    "toString": to_str,
}


class Renderer:
    def __init__(self, chart_dir, values, release, namespace):
        with open(os.path.join(chart_dir, "Chart.yaml")) as f:
            chart = yaml.safe_load(f)
        self.top = {
            "Values": values,
            "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart.get("appVersion", ""),
                      "name": chart["name"]},
            "Release": {"Name": release, "Namespace": namespace, "Service": "Helm", "IsInstall": True,
                        "IsUpgrade": False, "Revision": 1},
            "Capabilities": {"KubeVersion": {"Version": "v1.30.0"}},
            "Template": {"BasePath": "ablate/templates"},
        }
        self.defines = {}
        self.files = []
        tdir = os.path.join(chart_dir, "templates")
        for name in sorted(os.listdir(tdir)):
            with open(os.path.join(tdir, name)) as f:
                src = f.read()
            nodes = parse(tokenize(src, name), name, self.defines)
            if name.endswith((".yaml", ".yml")):
                self.files.append((name, nodes))

    def render_all(self):
        out = []
        for name, nodes in self.files:
            text = self.exec_nodes(nodes, Ctx(self, self.top, {"$": self.top}))
            docs = [d for d in re.split(r"(?m)^---\s*$", text) if d.strip()]
            for d in docs:
                out.append("---\n# Source: ablate/templates/%s\n%s\n" % (name, d.strip("\n")))
        return "".join(out)

    def exec_nodes(self, nodes, ctx):
        out = []
        for n in nodes:
            if n.kind == "text":
                out.append(n.text)
            elif n.kind == "action":
                v = self.pipeline(n.expr, ctx)
                if v is not _NOTHING:
                    out.append(to_str(v))
            elif n.kind == "if":
                if truthy(self.pipeline(n.cond, ctx)):
                    out.append(self.exec_nodes(n.body, ctx))
                elif n.els:
                    out.append(self.exec_nodes(n.els, ctx))
            elif n.kind == "with":
                v = self.pipeline(n.arg, ctx)
                if truthy(v):
                    out.append(self.exec_nodes(n.body, Ctx(self, v, dict(ctx.vars))))
                elif n.els:
                    out.append(self.exec_nodes(n.els, ctx))
            elif n.kind == "range":
                m = re.match(r"(\$\w+)\s*(?:,\s*(\$\w+))?\s*:=\s*(.*)", n.arg, re.S)
                names, expr = ((m.group(1), m.group(2)), m.group(3)) if m else ((None, None), n.arg)
                v = self.pipeline(expr, ctx)
                items = sorted(v.items()) if isinstance(v, dict) else list(enumerate(v or []))
                if not items and n.els:
                    out.append(self.exec_nodes(n.els, ctx))
                for k, item in items:
                    variables = dict(ctx.vars)
                    if names[1]:
                        variables[names[0]], variables[names[1]] = k, item
                    elif names[0]:
                        variables[names[0]] = item
                    out.append(self.exec_nodes(n.body, Ctx(self, item, variables)))
        return "".join(out)

    # pipeline: [$x :=] cmd | cmd | ...
    def pipeline(self, expr, ctx):
        toks = lex_expr(expr)
        assign = None
        if len(toks) >= 2 and toks[0][0] == "word" and toks[0][1].startswith("$") and toks[1] in (("op", ":="),
                                                                                                   ("op", "=")):
            assign, toks = toks[0][1], toks[2:]
        v = self.eval_pipeline(toks, ctx, expr)
        if assign:
            ctx.vars[assign] = v
            return _NOTHING
        return v

    def eval_pipeline(self, toks, ctx, expr):
        cmds, cur, depth = [], [], 0
        for t in toks:
            if t == ("op", "(") :
                depth += 1
            elif t == ("op", ")"):
                depth -= 1
            if t == ("op", "|") and depth == 0:
                cmds.append(cur)
                cur = []
            else:
                cur.append(t)
        cmds.append(cur)
        val, have = None, False
        for c in cmds:
            args = self.operands(c, ctx, expr)
            if have:
                args.append(("value", val))
            val, have = self.call(args, ctx, expr), True
        return val

    def operands(self, toks, ctx, expr):
        out, i = [], 0
        while i < len(toks):
            k, s = toks[i]
            if s == "(" and k == "op":
                depth, j = 1, i + 1
                while depth:
                    if toks[j] == ("op", "("):
                        depth += 1
                    elif toks[j] == ("op", ")"):
                        depth -= 1
                    j += 1
                inner = toks[i + 1:j - 1]
                v = self.eval_pipeline(inner, ctx, expr)
                # (expr).Field
                if j < len(toks) and toks[j][0] == "field":
                    v = field(v, toks[j][1].split(".")[1:], expr)
                    j += 1
                out.append(("value", v))
                i = j
                continue
            if k == "str":
                out.append(("value", parse_string(s)))
            elif k == "num":
                out.append(("value", float(s) if "." in s else int(s)))
            elif k == "word":
                out.append(("word", s))
            else:
                raise TemplateError("%s: unexpected %r" % (expr, s))
            i += 1
        return out

    def value_of(self, word, ctx, expr):
        if word == ".":
            return ctx.dot
        if word.startswith("$"):
            name, _, rest = word.partition(".")
            if name not in ctx.vars:
                raise TemplateError("%s: undefined variable %s" % (expr, name))
            return field(ctx.vars[name], rest.split(".") if rest else [], expr)
        if word.startswith("."):
            return field(ctx.dot, word.split(".")[1:], expr)
        if word in ("true", "false"):
            return word == "true"
        if word == "nil":
            return None
        raise TemplateError("%s: unknown word %s" % (expr, word))

    def call(self, args, ctx, expr):
        if not args:
            raise TemplateError("%s: empty command" % expr)
        kind, head = args[0]
        if kind == "word" and not head.startswith(("$", ".")) and head not in ("true", "false", "nil"):
            vals = [v if k == "value" else self.value_of(v, ctx, expr) for k, v in args[1:]]
            if head == "include":
                name, dot = vals[0], vals[1] if len(vals) > 1 else None
                if name not in self.defines:
                    raise TemplateError("%s: no template %r" % (expr, name))
                return self.exec_nodes(self.defines[name], Ctx(self, dot, {"$": dot}))
            if head not in FUNCS:
                raise TemplateError("%s: function %r is not supported by helm_render.py" % (expr, head))
            try:
                return FUNCS[head](*vals)
            except TemplateError:
                raise
            except Exception as e:  # noqa: BLE001
                raise TemplateError("%s: %s(%r): %s" % (expr, head, vals, e)) from e
        if len(args) != 1:
            raise TemplateError("%s: %s is not a function" % (expr, head))
        return head if kind == "value" else self.value_of(head, ctx, expr)


_NOTHING = object()


def merge(base, over):
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def render(chart_dir, value_files=(), release="ablate", namespace="default"):
    with open(os.path.join(chart_dir, "values.yaml")) as f:
        values = yaml.safe_load(f) or {}
    for vf in value_files:
        with open(vf) as f:
            merge(values, yaml.safe_load(f) or {})
    return Renderer(chart_dir, values, release, namespace).render_all()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("chart")
    ap.add_argument("-f", "--values", action="append", default=[])
    ap.add_argument("--release", default="ablate")
    ap.add_argument("--namespace", default="default")
    a = ap.parse_args()
    try:
        sys.stdout.write(render(a.chart, a.values, a.release, a.namespace))
    except TemplateError as e:
        sys.exit("helm_render: %s" % e)


if __name__ == "__main__":
    main()
