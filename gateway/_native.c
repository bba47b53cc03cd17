/* The gateway's per-event loops in C: the SSE fast path, the stored record, the wire framing.
 *
 * Each function does exactly what its Python twin does (gateway/sse.py, gateway/eventlog/records.py),
 * and tests/test_native.py checks them against each other on generated input. Anything unusual
 * (a CR line end, a block that is not a canonical event, a damaged record, an oversized event) is
 * not handled here: the function returns None and the Python code takes the whole input, so every
 * rule and every error message lives in one place, the Python one.
 *
 * Built by `pip install` (setup.py, optional: without a compiler the Python twins run).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#define MAX_ID_BYTES 4096 /* gateway.sse.MAX_ID_BYTES */

static int
starts(const char *p, Py_ssize_t n, const char *lit, Py_ssize_t k)
{
    return n >= k && memcmp(p, lit, (size_t)k) == 0;
}

/* bytes(p[:n]) + b"\n" */
static PyObject *
with_lf(const char *p, Py_ssize_t n)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, n + 1);
    if (out != NULL) {
        char *d = PyBytes_AS_STRING(out);
        memcpy(d, p, (size_t)n);
        d[n] = '\n';
    }
    return out;
}

static int
append_event(PyObject *events, PyObject *body, PyObject *uid)
{
    if (body == NULL || uid == NULL) {
        Py_XDECREF(body);
        Py_XDECREF(uid);
        return -1;
    }
    PyObject *ev = PyTuple_New(2);
    if (ev == NULL) {
        Py_DECREF(body);
        Py_DECREF(uid);
        return -1;
    }
    PyTuple_SET_ITEM(ev, 0, body);
    PyTuple_SET_ITEM(ev, 1, uid);
    int rc = PyList_Append(events, ev);
    Py_DECREF(ev);
    return rc;
}

/* One block between blank lines, its leading blank line already skipped: n bytes with nl line ends
 * (at most 2), the first and last of them at first and last. 1: handled; 0: not canonical (the
 * Python path takes the buffer); -1: error set. */
static int
take_block(const char *b, Py_ssize_t n, int nl, Py_ssize_t first, Py_ssize_t last, PyObject *events,
           long *comments)
{
    if (n == 0)
        return 1;
    if (nl == 0) {
        if (starts(b, n, "data: ", 6))
            return append_event(events, with_lf(b, n), Py_NewRef(Py_None)) < 0 ? -1 : 1;
        if (b[0] == ':') {
            (*comments)++;
            return 1;
        }
        return 0;
    }
    if (!starts(b, n, "event: ", 7) || !starts(b + first + 1, n - first - 1, "data: ", 6))
        return 0;
    if (nl == 1)
        return append_event(events, with_lf(b, n), Py_NewRef(Py_None)) < 0 ? -1 : 1;
    /* event, data, id */
    if (!starts(b + last + 1, n - last - 1, "id: ", 4) || memchr(b + last, '\0', (size_t)(n - last)) != NULL)
        return 0;
    Py_ssize_t idlen = n - last - 5;
    if (idlen > MAX_ID_BYTES)
        return 0; /* the Python path raises the error */
    PyObject *uid = PyUnicode_DecodeUTF8(b + last + 5, idlen, NULL);
    if (uid == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear(); /* not UTF-8: the Python path refuses it, with its reason */
        return 0;
    }
    PyObject *body = uid == NULL ? NULL : PyBytes_FromStringAndSize(b, last + 1);
    return append_event(events, body, uid) < 0 ? -1 : 1;
}

/* split_events(buf, max_event) -> (events, tail_start, comments) | None
 *
 * Blocks are what lies between the "\n\n"s of buf[:end] (end: the last "\n\n"), found left to right
 * as bytes.find would. One pass of memchr over the line ends finds both a block's end and its
 * lines: a token's event is read once, not once for its end and again for its lines. */
static PyObject *
split_events(PyObject *self, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t max_event;
    if (!PyArg_ParseTuple(args, "O!n:split_events", &PyBytes_Type, &obj, &max_event))
        return NULL;
    const char *buf = PyBytes_AS_STRING(obj);
    Py_ssize_t n = PyBytes_GET_SIZE(obj);
    if (memchr(buf, '\r', (size_t)n) != NULL)
        Py_RETURN_NONE;
    Py_ssize_t end = -1;
    for (Py_ssize_t k = n - 2; k >= 0; k--) {
        if (buf[k] == '\n' && buf[k + 1] == '\n') {
            end = k;
            break;
        }
    }
    PyObject *events = PyList_New(0);
    if (events == NULL)
        return NULL;
    long comments = 0;
    if (end < 0)
        return Py_BuildValue("(Nnl)", events, (Py_ssize_t)0, comments);
    Py_ssize_t p = 0;
    for (;;) {
        if (p + 1 < end && buf[p] == '\n' && buf[p + 1] == '\n') { /* an empty block */
            p += 2;
            continue;
        }
        /* A block begins with at most one blank line (two would have ended the block before). */
        Py_ssize_t start = p < end && buf[p] == '\n' ? p + 1 : p, stop = end, first = -1, last = -1;
        int nl = 0, found = 0;
        for (const char *c = start < end ? memchr(buf + start, '\n', (size_t)(end - start)) : NULL; c != NULL;
             c = memchr(c + 1, '\n', (size_t)(end - (c + 1 - buf)))) {
            Py_ssize_t at = c - buf;
            if (at + 1 < end && buf[at + 1] == '\n') {
                stop = at;
                found = 1;
                break;
            }
            if (++nl > 2) { /* not a canonical event: the Python path takes the buffer */
                Py_DECREF(events);
                Py_RETURN_NONE;
            }
            if (first < 0)
                first = at - start;
            last = at - start;
        }
        if (stop - p > max_event) { /* the Python path raises the error */
            Py_DECREF(events);
            Py_RETURN_NONE;
        }
        int rc = take_block(buf + start, stop - start, nl, first, last, events, &comments);
        if (rc <= 0) {
            Py_DECREF(events);
            if (rc < 0)
                return NULL;
            Py_RETURN_NONE;
        }
        if (!found)
            break;
        p = stop + 2;
    }
    return Py_BuildValue("(Nnl)", events, end + 2, comments);
}

static void
put_be(char *d, uint64_t v, int width)
{
    for (int i = width - 1; i >= 0; i--) {
        d[i] = (char)(v & 0xff);
        v >>= 8;
    }
}

/* encode_events(events, now_ms, first) -> (record, entries, nbytes, last_uid, last_name) */
static PyObject *
encode_events(PyObject *self, PyObject *args)
{
    PyObject *arg;
    unsigned long long now_ms;
    long long first;
    if (!PyArg_ParseTuple(args, "OKL:encode_events", &arg, &now_ms, &first))
        return NULL;
    PyObject *seq = PySequence_Fast(arg, "events must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *record = NULL, *entries = NULL, *name = NULL, *result = NULL;
    PyObject *last_uid = Py_None;
    Py_ssize_t total = 8, nbytes = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *ev = items[i];
        if (!PyTuple_Check(ev) || PyTuple_GET_SIZE(ev) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(ev, 0))) {
            PyErr_SetString(PyExc_TypeError, "an event is a (bytes, str | None) tuple");
            goto done;
        }
        PyObject *uid = PyTuple_GET_ITEM(ev, 1);
        Py_ssize_t ulen = 0, blen = PyBytes_GET_SIZE(PyTuple_GET_ITEM(ev, 0));
        if (uid != Py_None) {
            if (!PyUnicode_Check(uid)) {
                PyErr_SetString(PyExc_TypeError, "an event's id is a str or None");
                goto done;
            }
            if (PyUnicode_AsUTF8AndSize(uid, &ulen) == NULL)
                goto done;
            last_uid = uid;
        }
        if (ulen > 0xffff || (uint64_t)blen > 0xffffffffu) {
            PyErr_SetString(PyExc_ValueError, "an event or its id is too long for a record");
            goto done;
        }
        total += 6 + ulen + blen;
        nbytes += blen;
    }
    record = PyBytes_FromStringAndSize(NULL, total);
    entries = PyList_New(count);
    if (record == NULL || entries == NULL)
        goto done;
    char *d = PyBytes_AS_STRING(record);
    put_be(d, now_ms, 8);
    d += 8;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *body = PyTuple_GET_ITEM(items[i], 0), *uid = PyTuple_GET_ITEM(items[i], 1);
        Py_ssize_t ulen = 0, blen = PyBytes_GET_SIZE(body);
        const char *u = uid == Py_None ? "" : PyUnicode_AsUTF8AndSize(uid, &ulen);
        put_be(d, (uint64_t)blen, 4);
        put_be(d + 4, (uint64_t)ulen, 2);
        memcpy(d + 6, u, (size_t)ulen);
        memcpy(d + 6 + ulen, PyBytes_AS_STRING(body), (size_t)blen);
        d += 6 + ulen + blen;
        PyObject *entry = Py_BuildValue("(LO)", first + (long long)i, body);
        if (entry == NULL)
            goto done;
        PyList_SET_ITEM(entries, i, entry);
    }
    if (count == 0) {
        name = PyUnicode_FromString("");
    } else {
        PyObject *body = PyTuple_GET_ITEM(items[count - 1], 0);
        const char *b = PyBytes_AS_STRING(body);
        Py_ssize_t blen = PyBytes_GET_SIZE(body);
        if (starts(b, blen, "event: ", 7)) {
            const char *nl = memchr(b + 7, '\n', (size_t)(blen - 7));
            if (nl == NULL) {
                PyErr_SetString(PyExc_ValueError, "subsection not found"); /* what bytes.index says */
                goto done;
            }
            name = PyUnicode_DecodeUTF8(b + 7, nl - b - 7, "replace");
        } else {
            name = PyUnicode_FromString("message");
        }
    }
    if (name != NULL)
        result = Py_BuildValue("(OOnOO)", record, entries, nbytes, last_uid, name);
done:
    Py_XDECREF(name);
    Py_XDECREF(entries);
    Py_XDECREF(record);
    Py_DECREF(seq);
    return result;
}

/* b"id: %d\n\n" % s at d; returns the end. A digit loop, not sprintf: this runs once per event per
 * client, and sprintf's format parsing cost more than the copy of the event itself. */
static char *
put_id(char *d, long long s)
{
    char digits[24];
    int n = 0;
    unsigned long long v = s < 0 ? 0ULL - (unsigned long long)s : (unsigned long long)s;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    memcpy(d, "id: ", 4);
    d += 4;
    if (s < 0)
        *d++ = '-';
    while (n)
        *d++ = digits[--n];
    *d++ = '\n';
    *d++ = '\n';
    return d;
}

/* frame_entries(entries, chunked=False) -> b"".join(body + b"id: %d\n\n" % seq for seq, body in entries),
 * with chunked: those bytes as one chunk of a chunked body (b"%x\r\n%s\r\n"; b"" for no entries, as an
 * empty chunk would end the body). */
#define CHUNK_HEAD 18 /* room for up to 16 hex digits and CRLF */
static PyObject *
frame_entries(PyObject *self, PyObject *args)
{
    PyObject *arg;
    int chunked = 0;
    if (!PyArg_ParseTuple(args, "O|p:frame_entries", &arg, &chunked))
        return NULL;
    PyObject *seq = PySequence_Fast(arg, "entries must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t room = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *e = items[i];
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 2 || !PyLong_Check(PyTuple_GET_ITEM(e, 0))
                || !PyBytes_Check(PyTuple_GET_ITEM(e, 1))) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "an entry is an (int, bytes) tuple");
            return NULL;
        }
        room += PyBytes_GET_SIZE(PyTuple_GET_ITEM(e, 1)) + 4 + 21 + 2; /* body, "id: ", digits, "\n\n" */
    }
    if (chunked && count == 0) {
        Py_DECREF(seq);
        return PyBytes_FromStringAndSize(NULL, 0);
    }
    Py_ssize_t head = chunked ? CHUNK_HEAD : 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, head + room + (chunked ? 2 : 0));
    if (out == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    char *start = PyBytes_AS_STRING(out), *d = start + head;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *body = PyTuple_GET_ITEM(items[i], 1);
        long long s = PyLong_AsLongLong(PyTuple_GET_ITEM(items[i], 0));
        if (s == -1 && PyErr_Occurred()) {
            Py_DECREF(out);
            Py_DECREF(seq);
            return NULL;
        }
        Py_ssize_t blen = PyBytes_GET_SIZE(body);
        memcpy(d, PyBytes_AS_STRING(body), (size_t)blen);
        d += blen;
        d = put_id(d, s);
    }
    Py_DECREF(seq);
    if (chunked) {
        /* The chunk's size line goes right before the data, which moves left to meet it. */
        char line[CHUNK_HEAD + 1];
        int n = snprintf(line, sizeof line, "%zx\r\n", (size_t)(d - start - head));
        memmove(start + n, start + head, (size_t)(d - start - head));
        memcpy(start, line, (size_t)n);
        d -= head - n;
        *d++ = '\r';
        *d++ = '\n';
    }
    if (_PyBytes_Resize(&out, d - start) < 0)
        return NULL;
    return out;
}

static uint64_t
get_be(const unsigned char *p, int width)
{
    uint64_t v = 0;
    for (int i = 0; i < width; i++)
        v = (v << 8) | p[i];
    return v;
}

/* The head of a record's event at v[*i]: its body's and upstream id's lengths, and *i moved past
 * the head (to the id; the body follows it). 0 when the record ends inside the event (damaged). */
static int
event_head(const unsigned char *v, Py_ssize_t n, Py_ssize_t *i, Py_ssize_t *blen, Py_ssize_t *ulen)
{
    if (*i + 6 > n)
        return 0;
    *blen = (Py_ssize_t)get_be(v + *i, 4);
    *ulen = (Py_ssize_t)get_be(v + *i + 4, 2);
    *i += 6;
    return *i + *ulen + *blen <= n;
}

/* decode_record(first, value) -> [(seq, uid, body), ...] | None (damaged: the Python path says how) */
static PyObject *
decode_record(PyObject *self, PyObject *args)
{
    long long first;
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "LO!:decode_record", &first, &PyBytes_Type, &obj))
        return NULL;
    const unsigned char *v = (const unsigned char *)PyBytes_AS_STRING(obj);
    Py_ssize_t n = PyBytes_GET_SIZE(obj), i = 8;
    if (n < 8 + 6)
        Py_RETURN_NONE;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (long long s = first; i < n; s++) {
        Py_ssize_t blen, ulen;
        if (!event_head(v, n, &i, &blen, &ulen))
            goto damaged;
        const char *u = (const char *)v + i, *b = u + ulen;
        PyObject *uid = ulen ? PyUnicode_DecodeUTF8(u, ulen, "replace") : Py_NewRef(Py_None);
        PyObject *item = uid == NULL ? NULL : Py_BuildValue("(LNy#)", s, uid, b, blen);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
        i += ulen + blen;
    }
    return out;
damaged:
    Py_DECREF(out);
    Py_RETURN_NONE;
}


/* record_page(first, value, after, upto, most, room, anyway) -> (entries, body_bytes, full) | None:
 * the (seq, body) of a record with after < seq <= upto, as a page takes them: at most ``most``, and
 * no body that would take their bytes past ``room``, unless it is the first taken and ``anyway``.
 * ``full``: it stopped there with more of the range left in the record. The record is walked only
 * as far as the page takes it (a replay page of 64 KiB out of a record of 256 KiB allocated the
 * whole record's events, three quarters of them to be thrown away). None when the part walked is
 * damaged (the Python twin says how). */
static PyObject *
record_page(PyObject *self, PyObject *args)
{
    long long first, after, upto, most, room;
    int anyway;
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "LO!LLLLp:record_page", &first, &PyBytes_Type, &obj, &after, &upto, &most, &room,
                          &anyway))
        return NULL;
    const unsigned char *v = (const unsigned char *)PyBytes_AS_STRING(obj);
    Py_ssize_t n = PyBytes_GET_SIZE(obj), i = 8;
    if (n < 8 + 6)
        Py_RETURN_NONE;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    long long used = 0, taken = 0;
    int full = 0;
    for (long long s = first; i < n && s <= upto; s++) {
        Py_ssize_t blen, ulen;
        if (!event_head(v, n, &i, &blen, &ulen))
            goto damaged;
        if (after < s) {
            if (taken >= most || (used + blen > room && !(anyway && taken == 0))) {
                full = 1;
                break;
            }
            PyObject *item = Py_BuildValue("(Ly#)", s, (const char *)v + i + ulen, blen);
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(item);
            used += blen;
            taken++;
        }
        i += ulen + blen;
    }
    return Py_BuildValue("(NLi)", out, used, full);
damaged:
    Py_DECREF(out);
    Py_RETURN_NONE;
}


/* The payload of a chunked body's next bytes, as gateway.streamclient.LegConnection._dechunk_py
 * reads them. dechunk(buf, left, crlf, trailers, max_line) ->
 *   (payload, consumed, left, crlf, trailers, ended), or None for anything the Python twin must
 * say (a malformed chunk, a size too big for 60 bits). The state goes in and comes out whole, so
 * on None the Python code starts from the same state. */
static int
hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int
is_space(unsigned char c) /* what bytes.strip() strips */
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\x0b' || c == '\x0c';
}

#define MAX_SPANS 64

static PyObject *
dechunk(PyObject *self, PyObject *args)
{
    PyObject *obj;
    long long left_in;
    int crlf, trailers;
    Py_ssize_t max_line;
    if (!PyArg_ParseTuple(args, "O!Lppn:dechunk", &PyBytes_Type, &obj, &left_in, &crlf, &trailers, &max_line))
        return NULL;
    const char *b = PyBytes_AS_STRING(obj);
    Py_ssize_t end = PyBytes_GET_SIZE(obj), pos = 0, total = 0;
    uint64_t left = (uint64_t)(left_in < 0 ? 0 : left_in);
    Py_ssize_t starts_[MAX_SPANS], lens[MAX_SPANS];
    int spans = 0, ended = 0;
    while (pos < end) {
        if (left) {
            Py_ssize_t take = (uint64_t)(end - pos) < left ? end - pos : (Py_ssize_t)left;
            if (spans == MAX_SPANS)
                Py_RETURN_NONE; /* a read of many tiny chunks: the Python twin joins them */
            starts_[spans] = pos;
            lens[spans++] = take;
            total += take;
            pos += take;
            left -= (uint64_t)take;
            if (left)
                break;
            crlf = 1;
        }
        if (crlf) {
            if (end - pos < 2)
                break;
            if (b[pos] != '\r' || b[pos + 1] != '\n')
                Py_RETURN_NONE;
            pos += 2;
            crlf = 0;
        }
        const char *eolp = NULL;
        for (Py_ssize_t i = pos; i + 1 < end; i++) {
            if (b[i] == '\r' && b[i + 1] == '\n') {
                eolp = b + i;
                break;
            }
        }
        if (eolp == NULL) {
            if (end - pos > max_line)
                Py_RETURN_NONE;
            break;
        }
        Py_ssize_t ls = pos, le = eolp - b;
        pos = le + 2;
        if (trailers) {
            if (le == ls) {
                ended = 1;
                break;
            }
            continue;
        }
        for (Py_ssize_t i = ls; i < le; i++) {
            if (b[i] == ';') {
                le = i;
                break;
            }
        }
        while (ls < le && is_space((unsigned char)b[ls]))
            ls++;
        while (le > ls && is_space((unsigned char)b[le - 1]))
            le--;
        if (le == ls || le - ls > 15)
            Py_RETURN_NONE;
        uint64_t size = 0;
        for (Py_ssize_t i = ls; i < le; i++) {
            int h = hex_value((unsigned char)b[i]);
            if (h < 0)
                Py_RETURN_NONE;
            size = (size << 4) | (uint64_t)h;
        }
        left = size;
        if (!left)
            trailers = 1;
    }
    PyObject *payload;
    if (spans == 1) {
        payload = PyBytes_FromStringAndSize(b + starts_[0], lens[0]);
    } else {
        payload = PyBytes_FromStringAndSize(NULL, total);
        if (payload != NULL) {
            char *d = PyBytes_AS_STRING(payload);
            for (int i = 0; i < spans; i++) {
                memcpy(d, b + starts_[i], (size_t)lens[i]);
                d += lens[i];
            }
        }
    }
    if (payload == NULL)
        return NULL;
    return Py_BuildValue("(NnKOOO)", payload, pos, (unsigned long long)left, crlf ? Py_True : Py_False,
                         trailers ? Py_True : Py_False, ended ? Py_True : Py_False);
}


/* clone(obj) -> a shallow copy of an instance of a Python class derived straight from object with
 * only slots (no __dict__, no __weakref__), or None for any other object. The slots follow the object
 * header, a PyObject* each (an unset one is NULL and stays unset). A stream's metadata is copied
 * this way on every chunk (gateway.eventlog.base.StreamMeta.advanced). */
static PyObject *
clone_slots(PyObject *self, PyObject *obj)
{
    PyTypeObject *tp = Py_TYPE(obj);
    /* A class written in Python straight on object: nothing but its slots after the header. */
    if (!(tp->tp_flags & Py_TPFLAGS_HEAPTYPE) || tp->tp_base != &PyBaseObject_Type ||
        tp->tp_dictoffset != 0 || tp->tp_weaklistoffset != 0 || tp->tp_itemsize != 0 ||
        tp->tp_alloc == NULL || tp->tp_basicsize < (Py_ssize_t)sizeof(PyObject) ||
        (tp->tp_basicsize - (Py_ssize_t)sizeof(PyObject)) % (Py_ssize_t)sizeof(PyObject *) != 0)
        Py_RETURN_NONE;
    Py_ssize_t n = (tp->tp_basicsize - (Py_ssize_t)sizeof(PyObject)) / (Py_ssize_t)sizeof(PyObject *);
    PyObject *new = tp->tp_alloc(tp, 0);
    if (new == NULL)
        return NULL;
    PyObject **src = (PyObject **)((char *)obj + sizeof(PyObject));
    PyObject **dst = (PyObject **)((char *)new + sizeof(PyObject));
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_XINCREF(src[i]);
        dst[i] = src[i];
    }
    return new;
}

static PyMethodDef methods[] = {
    {"record_page", record_page, METH_VARARGS, "A record's part of a page: (entries, body bytes, full), or None when damaged."},
    {"split_events", split_events, METH_VARARGS, "The events of a buffer of canonical SSE blocks, or None."},
    {"encode_events", encode_events, METH_VARARGS, "A record of events and their entries."},
    {"frame_entries", frame_entries, METH_VARARGS, "Wire bytes for stored events with their gateway ids."},
    {"decode_record", decode_record, METH_VARARGS, "The events of a record, or None when it is damaged."},
    {"clone", clone_slots, METH_O, "A shallow copy of an instance with only slots, or None."},
    {"dechunk", dechunk, METH_VARARGS, "The payload of a chunked body's next bytes and the state after, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "gateway._native", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModule_Create(&module);
}
