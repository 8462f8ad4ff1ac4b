"""What a quantization library says while it works: the warnings and errors it raises, logs or
prints, counted and kept in the result (`quantization.messages`).

    with quantizer_messages() as said:
        quantize(...)
    said  # {'warnings': 149, 'errors': 14, 'messages': [{'level', 'source', 'message', 'count'}, ...]}
"""
import collections
import contextlib
import importlib
import logging
import os
import re
import sys
import threading
import warnings


LEVELED_LINE = re.compile(r"^(WARN|WARNING|ERROR|CRIT|CRITICAL)\b[\s:]*(.+)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MESSAGES_KEPT = 50


def import_libraries(method):
    """Import what quantizing with `method` imports, so that what those imports print is not taken for
    the quantizer's word about this model (transformers' model code imports torchao when installed)."""
    for name in ("transformers.modeling_utils", *method["modules"]):
        importlib.import_module(name)


@contextlib.contextmanager
def quantizer_messages():
    """What the quantization library complains about within the block, in the dict it yields (filled
    when the block ends): Python warnings, logging records of WARNING and above, and the lines it
    prints with a WARN or ERROR level (GPTQModel's logger writes to the terminal, not through
    logging: its Hessian and damp-recovery messages come this way). The output still reaches the terminal."""
    kept, found = {}, []

    class Keep(logging.Handler):
        def emit(self, record):
            found.append((record.levelname, record.name, record.getMessage()))

    handler = Keep(logging.WARNING)
    # the root, and every logger that does not pass its records up to it (transformers' own)
    loggers = [logging.getLogger()] + [x for x in logging.Logger.manager.loggerDict.values()
                                       if isinstance(x, logging.Logger) and not x.propagate]
    for x in loggers:
        x.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, tee_output() as printed:
            warnings.simplefilter("always")
            yield kept
    finally:
        for x in loggers:
            x.removeHandler(handler)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)  # shown as they would have been
        found.append(("WARNING", w.category.__name__, str(w.message)))
    for line in printed:
        m = LEVELED_LINE.match(line)
        if m:
            found.append(("ERROR" if m.group(1).startswith(("ERR", "CRIT")) else "WARNING", "printed output",
                          m.group(2).strip()))
    counts = collections.Counter(found)
    order = sorted(counts, key=lambda m: (m[0] == "WARNING", -counts[m]))  # errors first, then the most frequent
    kept.update({"warnings": sum(n for (level, _, _), n in counts.items() if level == "WARNING"),
                 "errors": sum(n for (level, _, _), n in counts.items() if level != "WARNING"),
                 "messages": [{"level": level, "source": source, "message": text[:500], "count": n}
                              for level, source, text in order[:MESSAGES_KEPT] for n in [counts[level, source, text]]]})
    if len(counts) > MESSAGES_KEPT:
        kept["messages_left_out"] = len(counts) - MESSAGES_KEPT


@contextlib.contextmanager
def tee_output(echo=True):
    """The lines written to file descriptors 1 and 2 within the block (by Python or native code), in
    the list it yields; passed through to where they were going unless `echo` is False."""
    lines, saved, pumps = [], {}, []
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in (1, 2):
        read_end, write_end = os.pipe()
        saved[fd] = os.dup(fd)
        os.dup2(write_end, fd)
        os.close(write_end)
        pumps.append(threading.Thread(target=_pump, args=(read_end, saved[fd] if echo else None, lines), daemon=True))
        pumps[-1].start()
    try:
        yield lines
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)  # closes the pipe's write end: its pump sees the end
        for fd, pump in zip((1, 2), pumps):
            # a process started within the block may still hold the pipe (a compile worker): its pump
            # then goes on passing output through, and what it read so far is kept
            pump.join(timeout=5)
            if not pump.is_alive():
                os.close(saved[fd])


def _pump(read_end, out, lines):
    tail = b""
    while chunk := os.read(read_end, 65536):
        if out is not None:
            os.write(out, chunk)
        tail += chunk
        *done, tail = re.split(rb"[\r\n]", tail)
        lines += [ANSI.sub("", d.decode(errors="replace")).strip() for d in done]
    lines.append(ANSI.sub("", tail.decode(errors="replace")).strip())
    os.close(read_end)
