/* streams._moderation_c: moderation's hot path in one pass over the text.
 *
 * For each character of the original text: the normalisation table (built in Python
 * by streams.normalize.table(), passed in as bytes: code point -> code point, or DROP),
 * then one Aho-Corasick step per automaton on the normalised code point, recording
 * for each normalised character the index of the original one, so a hit maps straight
 * back to the original span; word boundaries are checked on the original text. The
 * personal-data pre-check and the spam signals (link count, CRC-32 fingerprint of the
 * normalised text's UTF-8) ride along. A message that matches nothing costs one call
 * and comes back as the "pass" Verdict, built here.
 *
 * streams/moderation.py keeps the Python implementation as the reference and the
 * fallback; tests/test_native_moderation.py checks that both agree.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TABLE_SIZE 0x20000
#define DROP 0xFFFFFFFFu
#define NBLOCKS (0x110000 >> 8)
#define MAX_AUTOMATA 8
#define STACK_CHARS 512

/* flags table bits (streams.normalize.char_flags) */
#define F_WORD 1  /* is_word_char: NFKC is one ASCII letter or digit */
#define F_DIGIT 2 /* str.isdigit */
#define F_ASCII_DIGIT 4
#define F_HINT 8 /* '@', or a full-width digit or '@': personal data worth a look */

/* entry flags */
#define E_LEFT 1
#define E_RIGHT 2
#define E_LETTERS 4

/* ------------------------------------------------------------------ CRC-32 */

static uint32_t crc_tab[8][256];

static void
crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_tab[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++)
            crc_tab[t][i] = (crc_tab[t - 1][i] >> 8) ^ crc_tab[0][crc_tab[t - 1][i] & 0xff];
}

/* zlib.crc32(buf): slice-by-8 */
static uint32_t
crc32_of(const unsigned char *p, size_t n)
{
    uint32_t crc = 0xFFFFFFFFu;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (n >= 8) {
        uint32_t one, two;
        memcpy(&one, p, 4);
        memcpy(&two, p + 4, 4);
        one ^= crc;
        crc = crc_tab[7][one & 0xff] ^ crc_tab[6][(one >> 8) & 0xff] ^
              crc_tab[5][(one >> 16) & 0xff] ^ crc_tab[4][one >> 24] ^
              crc_tab[3][two & 0xff] ^ crc_tab[2][(two >> 8) & 0xff] ^
              crc_tab[1][(two >> 16) & 0xff] ^ crc_tab[0][two >> 24];
        p += 8;
        n -= 8;
    }
#endif
    while (n--)
        crc = crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static inline size_t
utf8_put(unsigned char *out, uint32_t c)
{
    if (c < 0x80) {
        out[0] = (unsigned char)c;
        return 1;
    }
    if (c < 0x800) {
        out[0] = (unsigned char)(0xC0 | (c >> 6));
        out[1] = (unsigned char)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c < 0x10000) {
        out[0] = (unsigned char)(0xE0 | (c >> 12));
        out[1] = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
        out[2] = (unsigned char)(0x80 | (c & 0x3F));
        return 3;
    }
    out[0] = (unsigned char)(0xF0 | (c >> 18));
    out[1] = (unsigned char)(0x80 | ((c >> 12) & 0x3F));
    out[2] = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
    out[3] = (unsigned char)(0x80 | (c & 0x3F));
    return 4;
}

/* ------------------------------------------------------------- the automaton */

typedef struct {
    uint32_t cls;
    int32_t next;
} Trans;

typedef struct {
    uint32_t cat;
    uint32_t flags;
} Entry;

/* One state, one cache line fetch: what a step and a match test read. States are
 * numbered breadth first, so the shallow ones every text visits sit together. */
typedef struct {
    int32_t fail;
    int32_t report; /* the state's own match, or the nearest on its failure chain */
    uint32_t tstart, tcount;
    uint32_t cls[2]; /* the first two transitions inline: most states have one or two */
    int32_t next[2];
} State; /* 32 bytes, allocated 64-aligned: never split across cache lines */

/* tcount of a state with a dense row: every class in [cls[0], cls[0] + cls[1]) maps
 * straight to the next state (failure links already followed) through dense[tstart + d].
 * For states with many children (Latin prefixes): no search, no misprediction. */
#define DENSE 0xFFFFFFFFu

typedef struct {
    PyObject_HEAD
    /* code point -> class (0: in no pattern), two levels of 256 */
    uint32_t *blocks[NBLOCKS];
    uint32_t nclasses;
    int32_t *root_next; /* class -> state, dense: the root sees every class */
    uint8_t *root_out;  /* class -> the root's transition reaches a match: no state load */
    int32_t nstates;
    State *states;
    int32_t *dense;
    /* Bigram filter: a bit per hash of two adjacent classes in any pattern. When the
     * last two characters' classes are no pattern's pair, the state is simply the root's
     * transition: no dependence on the previous state, so no chain of cache misses. */
    uint64_t *pairs;
    uint32_t pair_mask; /* bits - 1 */
    int32_t *out, *dict;
    Trans *trans;
    int32_t npatterns;
    int32_t *plen;
    uint32_t *ent_start, *ent_count;
    Entry *entries;
    Py_ssize_t nentries;
    PyObject *categories; /* tuple of str */
} Automaton;

static void
automaton_free_arrays(Automaton *a)
{
    for (int i = 0; i < NBLOCKS; i++) {
        PyMem_Free(a->blocks[i]);
        a->blocks[i] = NULL;
    }
    PyMem_Free(a->root_next);
    PyMem_Free(a->root_out);
    a->root_out = NULL;
    PyMem_Free(a->dense);
    a->dense = NULL;
    PyMem_Free(a->pairs);
    a->pairs = NULL;
    free(a->states);
    PyMem_Free(a->out);
    PyMem_Free(a->dict);
    PyMem_Free(a->trans);
    PyMem_Free(a->plen);
    PyMem_Free(a->ent_start);
    PyMem_Free(a->ent_count);
    PyMem_Free(a->entries);
    a->root_next = a->out = a->dict = a->plen = NULL;
    a->states = NULL;
    a->ent_start = a->ent_count = NULL;
    a->trans = NULL;
    a->entries = NULL;
}

static void
automaton_dealloc(Automaton *a)
{
    automaton_free_arrays(a);
    Py_XDECREF(a->categories);
    Py_TYPE(a)->tp_free((PyObject *)a);
}

static inline uint32_t
class_of(const Automaton *a, uint32_t cp)
{
    const uint32_t *b = a->blocks[cp >> 8];
    return b ? b[cp & 0xFF] : 0;
}

static inline int32_t step(const Automaton *a, int32_t s, uint32_t c);

static inline uint32_t
pair_hash(const Automaton *a, uint32_t prev, uint32_t c)
{
    return ((prev * 0x9E3779B1u) ^ (c * 0x85EBCA77u)) & a->pair_mask;
}

static inline int
pair_maybe(const Automaton *a, uint32_t prev, uint32_t c)
{
    uint32_t h = pair_hash(a, prev, c);
    return (a->pairs[h >> 6] >> (h & 63)) & 1;
}

/* the next state: the root's transition when no pattern holds the pair (prev, c) */
static inline int32_t
advance(const Automaton *a, int32_t s, uint32_t prev, uint32_t c)
{
    if (!prev || !pair_maybe(a, prev, c))
        return a->root_next[c];
    return step(a, s, c);
}

static inline int32_t
step(const Automaton *a, int32_t s, uint32_t c)
{
    /* Loaded before the state, not after it: most steps fail to the root. */
    int32_t from_root = a->root_next[c];
    for (;;) {
        if (s == 0)
            return from_root;
        const State *q = a->states + s;
        uint32_t n = q->tcount;
        if (n == DENSE) {
            uint32_t d = c - q->cls[0];
            if (d < q->cls[1])
                return a->dense[q->tstart + d];
            s = q->fail;
            continue;
        }
        if (n <= 2) {
            if (n > 0 && q->cls[0] == c)
                return q->next[0];
            if (n > 1 && q->cls[1] == c)
                return q->next[1];
            s = q->fail;
            continue;
        }
        const Trans *t = a->trans + q->tstart;
        if (n <= 8) {
            for (uint32_t i = 0; i < n; i++)
                if (t[i].cls == c)
                    return t[i].next;
        }
        else {
            uint32_t lo = 0, hi = n;
            while (lo < hi) {
                uint32_t mid = (lo + hi) >> 1;
                if (t[mid].cls < c)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            if (lo < n && t[lo].cls == c)
                return t[lo].next;
        }
        s = q->fail;
    }
}

/* build-time trie: children as sibling lists (the root's are dense) */
typedef struct {
    int32_t *first, *sibling, *out;
    uint32_t *edge;
    int32_t n, cap;
} Trie;

static int
trie_grow(Trie *t)
{
    int32_t cap = t->cap ? t->cap * 2 : 1024;
    int32_t *first = PyMem_Realloc(t->first, (size_t)cap * sizeof(int32_t));
    if (!first)
        return -1;
    t->first = first;
    int32_t *sibling = PyMem_Realloc(t->sibling, (size_t)cap * sizeof(int32_t));
    if (!sibling)
        return -1;
    t->sibling = sibling;
    int32_t *out = PyMem_Realloc(t->out, (size_t)cap * sizeof(int32_t));
    if (!out)
        return -1;
    t->out = out;
    uint32_t *edge = PyMem_Realloc(t->edge, (size_t)cap * sizeof(uint32_t));
    if (!edge)
        return -1;
    t->edge = edge;
    t->cap = cap;
    return 0;
}

static int32_t
trie_new(Trie *t, uint32_t edge)
{
    if (t->n == t->cap && trie_grow(t) < 0)
        return -1;
    int32_t s = t->n++;
    t->first[s] = -1;
    t->sibling[s] = -1;
    t->out[s] = -1;
    t->edge[s] = edge;
    return s;
}

static int32_t
trie_child(const Trie *t, const int32_t *root_next, int32_t s, uint32_t c)
{
    if (s == 0)
        return root_next[c] ? root_next[c] : -1;
    for (int32_t k = t->first[s]; k >= 0; k = t->sibling[k])
        if (t->edge[k] == c)
            return k;
    return -1;
}

static int
cmp_trans(const void *x, const void *y)
{
    uint32_t a = ((const Trans *)x)->cls, b = ((const Trans *)y)->cls;
    return (a > b) - (a < b);
}

static int
assign_class(Automaton *a, uint32_t cp)
{
    uint32_t **b = &a->blocks[cp >> 8];
    if (!*b) {
        *b = PyMem_Calloc(256, sizeof(uint32_t));
        if (!*b) {
            PyErr_NoMemory();
            return -1;
        }
    }
    (*b)[cp & 0xFF] = 1; /* numbered later, in code point order */
    return 0;
}

/* Classes in code point order, so one script's letters have neighbouring classes. */
static void
number_classes(Automaton *a)
{
    a->nclasses = 0;
    for (int i = 0; i < NBLOCKS; i++)
        if (a->blocks[i])
            for (int k = 0; k < 256; k++)
                if (a->blocks[i][k])
                    a->blocks[i][k] = ++a->nclasses;
}

/* the full transition, following failure links, on sparse states only (build time) */
static int32_t
step_sparse(const Automaton *a, int32_t s, uint32_t c)
{
    for (;;) {
        if (s == 0)
            return a->root_next[c];
        const State *q = a->states + s;
        const Trans *t = a->trans + q->tstart;
        for (uint32_t i = 0; i < q->tcount; i++)
            if (t[i].cls == c)
                return t[i].next;
        s = q->fail;
    }
}

/* Automaton(patterns, entries, categories)
 *   patterns: sequence of distinct non-empty str (normalised words)
 *   entries: per pattern, a sequence of (category index, flags)
 *   categories: tuple of str */
static int
automaton_init(Automaton *a, PyObject *args, PyObject *kwds)
{
    PyObject *patterns, *entries, *categories;
    static char *kwlist[] = {"patterns", "entries", "categories", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!", kwlist, &patterns, &entries,
                                     &PyTuple_Type, &categories))
        return -1;
    if (a->categories) {
        PyErr_SetString(PyExc_TypeError, "Automaton is immutable");
        return -1;
    }
    PyObject *pats = PySequence_Fast(patterns, "patterns must be a sequence");
    if (!pats)
        return -1;
    PyObject *ents = PySequence_Fast(entries, "entries must be a sequence");
    if (!ents) {
        Py_DECREF(pats);
        return -1;
    }
    Trie t = {0};
    int32_t *queue = NULL;
    Py_ssize_t np = PySequence_Fast_GET_SIZE(pats);
    Py_ssize_t ncat = PyTuple_GET_SIZE(categories);
    if (PySequence_Fast_GET_SIZE(ents) != np) {
        PyErr_SetString(PyExc_ValueError, "one entries sequence per pattern");
        goto error;
    }
    if (np > INT32_MAX / 2) {
        PyErr_SetString(PyExc_OverflowError, "too many patterns");
        goto error;
    }
    a->npatterns = (int32_t)np;
    /* classes: every code point in a pattern */
    for (Py_ssize_t p = 0; p < np; p++) {
        PyObject *s = PySequence_Fast_GET_ITEM(pats, p);
        if (!PyUnicode_Check(s) || PyUnicode_GET_LENGTH(s) == 0) {
            PyErr_SetString(PyExc_ValueError, "patterns must be non-empty str");
            goto error;
        }
        int kind = PyUnicode_KIND(s);
        const void *data = PyUnicode_DATA(s);
        for (Py_ssize_t i = 0; i < PyUnicode_GET_LENGTH(s); i++)
            if (assign_class(a, PyUnicode_READ(kind, data, i)) < 0)
                goto error;
    }
    number_classes(a);
    a->root_next = PyMem_Calloc((size_t)a->nclasses + 1, sizeof(int32_t));
    a->plen = PyMem_Calloc((size_t)np + 1, sizeof(int32_t));
    a->ent_start = PyMem_Calloc((size_t)np + 1, sizeof(uint32_t));
    a->ent_count = PyMem_Calloc((size_t)np + 1, sizeof(uint32_t));
    if (!a->root_next || !a->plen || !a->ent_start || !a->ent_count) {
        PyErr_NoMemory();
        goto error;
    }
    /* entries */
    Py_ssize_t total = 0;
    for (Py_ssize_t p = 0; p < np; p++) {
        Py_ssize_t k = PyObject_Length(PySequence_Fast_GET_ITEM(ents, p));
        if (k < 0)
            goto error;
        total += k;
    }
    a->entries = PyMem_Calloc((size_t)total + 1, sizeof(Entry));
    if (!a->entries) {
        PyErr_NoMemory();
        goto error;
    }
    a->nentries = total;
    Py_ssize_t e = 0;
    for (Py_ssize_t p = 0; p < np; p++) {
        PyObject *list = PySequence_Fast(PySequence_Fast_GET_ITEM(ents, p), "entries");
        if (!list)
            goto error;
        a->ent_start[p] = (uint32_t)e;
        a->ent_count[p] = (uint32_t)PySequence_Fast_GET_SIZE(list);
        for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(list); k++) {
            long cat, flags;
            if (e >= total ||
                !PyArg_ParseTuple(PySequence_Fast_GET_ITEM(list, k), "ll", &cat, &flags)) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_ValueError, "entries changed size");
                Py_DECREF(list);
                goto error;
            }
            if (cat < 0 || cat >= ncat) {
                PyErr_SetString(PyExc_ValueError, "category index out of range");
                Py_DECREF(list);
                goto error;
            }
            a->entries[e].cat = (uint32_t)cat;
            a->entries[e].flags = (uint32_t)flags;
            e++;
        }
        Py_DECREF(list);
    }
    /* the trie */
    if (trie_new(&t, 0) < 0) {
        PyErr_NoMemory();
        goto error;
    }
    for (Py_ssize_t p = 0; p < np; p++) {
        PyObject *s = PySequence_Fast_GET_ITEM(pats, p);
        int kind = PyUnicode_KIND(s);
        const void *data = PyUnicode_DATA(s);
        Py_ssize_t len = PyUnicode_GET_LENGTH(s);
        int32_t node = 0;
        for (Py_ssize_t i = 0; i < len; i++) {
            uint32_t c = class_of(a, PyUnicode_READ(kind, data, i));
            int32_t next = trie_child(&t, a->root_next, node, c);
            if (next < 0) {
                next = trie_new(&t, c);
                if (next < 0) {
                    PyErr_NoMemory();
                    goto error;
                }
                if (node == 0)
                    a->root_next[c] = next;
                else {
                    t.sibling[next] = t.first[node];
                    t.first[node] = next;
                }
            }
            node = next;
        }
        if (t.out[node] >= 0) {
            PyErr_SetString(PyExc_ValueError, "patterns must be distinct");
            goto error;
        }
        t.out[node] = (int32_t)p;
        a->plen[p] = (int32_t)len;
    }
    /* the pair filter: ~16 bits per pair, 2^12 .. 2^23 bits */
    {
        size_t npairs = 0;
        for (Py_ssize_t p = 0; p < np; p++)
            npairs += (size_t)a->plen[p];
        uint32_t bits = 1u << 12;
        while (bits < (1u << 23) && bits < 16 * npairs)
            bits <<= 1;
        a->pair_mask = bits - 1;
        a->pairs = PyMem_Calloc(bits / 64, sizeof(uint64_t));
        if (!a->pairs) {
            PyErr_NoMemory();
            goto error;
        }
        for (Py_ssize_t p = 0; p < np; p++) {
            PyObject *str = PySequence_Fast_GET_ITEM(pats, p);
            int kind = PyUnicode_KIND(str);
            const void *data = PyUnicode_DATA(str);
            uint32_t prev = class_of(a, PyUnicode_READ(kind, data, 0));
            for (Py_ssize_t i = 1; i < PyUnicode_GET_LENGTH(str); i++) {
                uint32_t c = class_of(a, PyUnicode_READ(kind, data, i));
                uint32_t h = pair_hash(a, prev, c);
                a->pairs[h >> 6] |= (uint64_t)1 << (h & 63);
                prev = c;
            }
        }
    }
    int32_t n = t.n;
    a->nstates = n;
    int32_t *fail = PyMem_Calloc((size_t)n, sizeof(int32_t));
    int32_t *dict = PyMem_Calloc((size_t)n, sizeof(int32_t));
    int32_t *renum = PyMem_Calloc((size_t)n, sizeof(int32_t));
    a->states = aligned_alloc(64, ((size_t)n * sizeof(State) + 63) & ~(size_t)63);
    if (a->states)
        memset(a->states, 0, (size_t)n * sizeof(State));
    a->dict = PyMem_Calloc((size_t)n, sizeof(int32_t));
    a->out = PyMem_Calloc((size_t)n, sizeof(int32_t));
    a->trans = PyMem_Calloc((size_t)n, sizeof(Trans));
    queue = PyMem_Calloc((size_t)n, sizeof(int32_t));
    if (!fail || !dict || !renum || !a->states || !a->dict || !a->out || !a->trans || !queue) {
        PyMem_Free(fail);
        PyMem_Free(dict);
        PyMem_Free(renum);
        PyErr_NoMemory();
        goto error;
    }
    /* breadth first: failure and dictionary links, on the build numbering */
    int32_t head = 0, tail = 0;
    queue[tail++] = 0;
    dict[0] = -1;
    for (uint32_t c = 1; c <= a->nclasses; c++) {
        int32_t v = a->root_next[c];
        if (v) {
            fail[v] = 0;
            dict[v] = -1;
            queue[tail++] = v;
        }
    }
    head = 1;
    while (head < tail) {
        int32_t u = queue[head++];
        for (int32_t v = t.first[u]; v >= 0; v = t.sibling[v]) {
            uint32_t c = t.edge[v];
            int32_t f = fail[u];
            int32_t to;
            for (;;) {
                to = trie_child(&t, a->root_next, f, c);
                if (to >= 0 || f == 0)
                    break;
                f = fail[f];
            }
            fail[v] = to >= 0 ? to : 0;
            int32_t fv = fail[v];
            dict[v] = t.out[fv] >= 0 ? fv : dict[fv];
            queue[tail++] = v;
        }
    }
    /* renumber in breadth-first order; children flattened, sorted by class */
    for (int32_t i = 0; i < n; i++)
        renum[queue[i]] = i;
    uint32_t at = 0;
    for (int32_t i = 0; i < n; i++) {
        int32_t o = queue[i];
        State *q = &a->states[i];
        q->fail = renum[fail[o]];
        a->out[i] = t.out[o];
        a->dict[i] = dict[o] >= 0 ? renum[dict[o]] : -1;
        q->report = t.out[o] >= 0 ? i : a->dict[i];
        q->tstart = at;
        if (i == 0)
            continue;
        for (int32_t v = t.first[o]; v >= 0; v = t.sibling[v]) {
            a->trans[at].cls = t.edge[v];
            a->trans[at].next = renum[v];
            at++;
        }
        q->tcount = at - q->tstart;
        qsort(a->trans + q->tstart, q->tcount, sizeof(Trans), cmp_trans);
        for (uint32_t x = 0; x < q->tcount && x < 2; x++) {
            q->cls[x] = a->trans[q->tstart + x].cls;
            q->next[x] = a->trans[q->tstart + x].next;
        }
    }
    for (uint32_t c = 1; c <= a->nclasses; c++)
        if (a->root_next[c])
            a->root_next[c] = renum[a->root_next[c]];
    /* dense rows for states with more than two children in a narrow class band */
    size_t dense_size = 0, dense_cap = 0;
    int32_t ndense = 0;
    for (int32_t i = 1; i < n; i++) {
        State *q = &a->states[i];
        if (q->tcount <= 2)
            continue;
        uint32_t lo = a->trans[q->tstart].cls;
        uint32_t span = a->trans[q->tstart + q->tcount - 1].cls - lo + 1;
        if (span > 4 * q->tcount + 32)
            continue;
        if (dense_size + span > dense_cap) {
            size_t cap = dense_cap ? dense_cap * 2 : 4096;
            while (cap < dense_size + span)
                cap *= 2;
            int32_t *grown = PyMem_Realloc(a->dense, cap * sizeof(int32_t));
            if (!grown) {
                PyMem_Free(fail);
                PyMem_Free(dict);
                PyMem_Free(renum);
                PyErr_NoMemory();
                goto error;
            }
            a->dense = grown;
            dense_cap = cap;
        }
        for (uint32_t d = 0; d < span; d++)
            a->dense[dense_size + d] = step_sparse(a, i, lo + d);
        /* keep the sparse fields for step_sparse on later states: mark dense after */
        queue[ndense++] = i;
        renum[i] = (int32_t)dense_size; /* reuse: the row's offset */
        dense_size += span;
    }
    a->root_out = PyMem_Calloc((size_t)a->nclasses + 1, 1);
    if (!a->root_out) {
        PyMem_Free(fail);
        PyMem_Free(dict);
        PyMem_Free(renum);
        PyErr_NoMemory();
        goto error;
    }
    for (uint32_t c = 1; c <= a->nclasses; c++)
        a->root_out[c] = a->root_next[c] && a->states[a->root_next[c]].report >= 0;
    for (int32_t x = 0; x < ndense; x++) {
        State *q = &a->states[queue[x]];
        uint32_t lo = a->trans[q->tstart].cls;
        uint32_t span = a->trans[q->tstart + q->tcount - 1].cls - lo + 1;
        q->tstart = (uint32_t)renum[queue[x]];
        q->tcount = DENSE;
        q->cls[0] = lo;
        q->cls[1] = span;
        q->next[0] = q->next[1] = -1;
    }
    PyMem_Free(fail);
    PyMem_Free(dict);
    PyMem_Free(renum);
    PyMem_Free(queue);
    PyMem_Free(t.first);
    PyMem_Free(t.sibling);
    PyMem_Free(t.out);
    PyMem_Free(t.edge);
    Py_DECREF(pats);
    Py_DECREF(ents);
    Py_INCREF(categories);
    a->categories = categories;
    return 0;
error:
    PyMem_Free(queue);
    PyMem_Free(t.first);
    PyMem_Free(t.sibling);
    PyMem_Free(t.out);
    PyMem_Free(t.edge);
    Py_DECREF(pats);
    Py_DECREF(ents);
    automaton_free_arrays(a);
    a->nclasses = 0;
    return -1;
}

static PyObject *
automaton_find(Automaton *a, PyObject *text)
{
    /* (pattern index, start, end) of every match in an already normalised text, like
     * ahocorasick_rs's find_matches_as_indexes(text, overlapping=True): for tests. */
    if (!a->categories) {
        PyErr_SetString(PyExc_RuntimeError, "Automaton not initialised");
        return NULL;
    }
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "text must be str");
        return NULL;
    }
    PyObject *found = PyList_New(0);
    if (!found)
        return NULL;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    int32_t s = 0;
    uint32_t prev = 0;
    for (Py_ssize_t i = 0; i < PyUnicode_GET_LENGTH(text); i++) {
        uint32_t c = class_of(a, PyUnicode_READ(kind, data, i));
        s = c ? advance(a, s, prev, c) : 0;
        prev = c;
        for (int32_t r = a->states[s].report; r >= 0; r = a->dict[r]) {
            int32_t p = a->out[r];
            PyObject *m = Py_BuildValue("(inn)", p, i + 1 - a->plen[p], i + 1);
            if (!m || PyList_Append(found, m) < 0) {
                Py_XDECREF(m);
                Py_DECREF(found);
                return NULL;
            }
            Py_DECREF(m);
        }
    }
    return found;
}

static PyObject *
automaton_states(Automaton *a, void *closure)
{
    return PyLong_FromLong(a->nstates);
}

static PyMethodDef automaton_methods[] = {
    {"find", (PyCFunction)automaton_find, METH_O, "Every match in a normalised text."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
automaton_categories(Automaton *a, void *closure)
{
    if (!a->categories)
        return PyTuple_New(0);
    Py_INCREF(a->categories);
    return a->categories;
}

static PyGetSetDef automaton_getset[] = {
    {"states", (getter)automaton_states, NULL, "number of states", NULL},
    {"categories", (getter)automaton_categories, NULL, "category names, by index", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject AutomatonType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "streams._moderation_c.Automaton",
    .tp_basicsize = sizeof(Automaton),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An Aho-Corasick automaton over normalised code points.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)automaton_init,
    .tp_dealloc = (destructor)automaton_dealloc,
    .tp_methods = automaton_methods,
    .tp_getset = automaton_getset,
};

/* ---------------------------------------------------------------- the scanner */

typedef struct {
    PyObject_HEAD
    int n;
    Automaton *autos[MAX_AUTOMATA];
    const uint8_t *enabled[MAX_AUTOMATA];
    const uint8_t *action[MAX_AUTOMATA]; /* per category: index into actions */
    PyObject *actions; /* ("pass", "flag", "mask", "block"): stronger last */
    PyObject *refs; /* the (automaton, enabled) tuple, kept alive */
    PyObject *norm_bytes, *flags_bytes;
    const uint32_t *norm;
    const uint8_t *flags;
    PyObject *verdict_cls, *version, *pass_str, *empty;
    PyObject *on_found; /* (text, spans, personal?, spam?) -> Verdict, in Python */
    int personal_on, spam_on;
    long long repeats, repeat_window, links, link_window;
} Scanner;

static int
scanner_traverse(Scanner *s, visitproc visit, void *arg)
{
    Py_VISIT(s->refs);
    Py_VISIT(s->verdict_cls);
    Py_VISIT(s->on_found);
    Py_VISIT(s->actions);
    return 0;
}

static int
scanner_clear(Scanner *s)
{
    Py_CLEAR(s->refs);
    Py_CLEAR(s->norm_bytes);
    Py_CLEAR(s->flags_bytes);
    Py_CLEAR(s->verdict_cls);
    Py_CLEAR(s->version);
    Py_CLEAR(s->pass_str);
    Py_CLEAR(s->empty);
    Py_CLEAR(s->on_found);
    Py_CLEAR(s->actions);
    s->n = 0;
    return 0;
}

static void
scanner_dealloc(Scanner *s)
{
    PyObject_GC_UnTrack(s);
    scanner_clear(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

/* Scanner(matchers, actions, norm, flags, verdict, version, personal, spam, limits, on_found)
 *   matchers: tuple of (Automaton, bytes: enabled per entry, bytes: action per category)
 *   actions: the action names by strength, weakest first ("pass", "flag", ...)
 *   norm: bytes, TABLE_SIZE native uint32 (DROP: dropped)
 *   flags: bytes, TABLE_SIZE (F_WORD | F_DIGIT)
 *   verdict: the Verdict class (a tuple subclass of four fields)
 *   limits: (repeats, repeat_window_ms, links, link_window_ms)
 *   on_found: called with (text, spans, personal?, spam?) when the text is no pass */
static int
scanner_init(Scanner *s, PyObject *args, PyObject *kwds)
{
    PyObject *matchers, *actions, *norm, *flags, *verdict, *version, *on_found;
    int personal, spam;
    long long repeats, repeat_window, links, link_window;
    if (kwds && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Scanner takes positional arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "O!O!SSO!O!pp(LLLL)O", &PyTuple_Type, &matchers,
                          &PyTuple_Type, &actions, &norm, &flags, &PyType_Type, &verdict,
                          &PyLong_Type, &version, &personal, &spam, &repeats, &repeat_window,
                          &links, &link_window, &on_found))
        return -1;
    Py_ssize_t nactions = PyTuple_GET_SIZE(actions);
    if (nactions < 1 || nactions > 255) {
        PyErr_SetString(PyExc_ValueError, "actions");
        return -1;
    }
    for (Py_ssize_t i = 0; i < nactions; i++)
        if (!PyUnicode_Check(PyTuple_GET_ITEM(actions, i))) {
            PyErr_SetString(PyExc_TypeError, "actions must be str");
            return -1;
        }
    if (!PyCallable_Check(on_found)) {
        PyErr_SetString(PyExc_TypeError, "on_found must be callable");
        return -1;
    }
    if (s->refs) {
        PyErr_SetString(PyExc_TypeError, "Scanner is immutable");
        return -1;
    }
    if (PyBytes_GET_SIZE(norm) != TABLE_SIZE * 4 || PyBytes_GET_SIZE(flags) != TABLE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "table sizes");
        return -1;
    }
    if (!PyType_IsSubtype((PyTypeObject *)verdict, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "verdict must be a tuple subclass");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(matchers);
    if (n > MAX_AUTOMATA) {
        PyErr_SetString(PyExc_ValueError, "too many automata");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyTuple_GET_ITEM(matchers, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 3 ||
            !PyObject_TypeCheck(PyTuple_GET_ITEM(pair, 0), &AutomatonType) ||
            !PyBytes_Check(PyTuple_GET_ITEM(pair, 1)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(pair, 2))) {
            PyErr_SetString(PyExc_TypeError, "matchers: (Automaton, bytes, bytes)");
            return -1;
        }
        Automaton *a = (Automaton *)PyTuple_GET_ITEM(pair, 0);
        if (!a->categories) {
            PyErr_SetString(PyExc_ValueError, "Automaton not initialised");
            return -1;
        }
        if (PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 1)) != a->nentries) {
            PyErr_SetString(PyExc_ValueError, "one enabled flag per entry");
            return -1;
        }
        PyObject *codes = PyTuple_GET_ITEM(pair, 2);
        if (PyBytes_GET_SIZE(codes) != PyTuple_GET_SIZE(a->categories)) {
            PyErr_SetString(PyExc_ValueError, "one action per category");
            return -1;
        }
        for (Py_ssize_t c = 0; c < PyBytes_GET_SIZE(codes); c++)
            if ((uint8_t)PyBytes_AS_STRING(codes)[c] >= nactions) {
                PyErr_SetString(PyExc_ValueError, "action index out of range");
                return -1;
            }
        s->autos[i] = a;
        s->enabled[i] = (const uint8_t *)PyBytes_AS_STRING(PyTuple_GET_ITEM(pair, 1));
        s->action[i] = (const uint8_t *)PyBytes_AS_STRING(codes);
    }
    s->n = (int)n;
    Py_INCREF(matchers);
    s->refs = matchers;
    Py_INCREF(norm);
    s->norm_bytes = norm;
    s->norm = (const uint32_t *)PyBytes_AS_STRING(norm);
    Py_INCREF(flags);
    s->flags_bytes = flags;
    s->flags = (const uint8_t *)PyBytes_AS_STRING(flags);
    Py_INCREF(verdict);
    s->verdict_cls = verdict;
    Py_INCREF(version);
    s->version = version;
    Py_INCREF(on_found);
    s->on_found = on_found;
    Py_INCREF(actions);
    s->actions = actions;
    s->pass_str = PyUnicode_InternFromString("pass");
    s->empty = PyTuple_New(0);
    if (!s->pass_str || !s->empty)
        return -1;
    s->personal_on = personal;
    s->spam_on = spam;
    s->repeats = repeats;
    s->repeat_window = repeat_window;
    s->links = links;
    s->link_window = link_window;
    return 0;
}

static inline int
word_char(const Scanner *s, Py_UCS4 c)
{
    return c < TABLE_SIZE && (s->flags[c] & F_WORD);
}

/* streams.moderation._accepts, on the original text */
static int
accepts(const Scanner *s, uint32_t flags, int kind, const void *data, Py_ssize_t len,
        Py_ssize_t first, Py_ssize_t last, int separated)
{
    if ((flags & E_LEFT) && first > 0) {
        Py_UCS4 before = PyUnicode_READ(kind, data, first - 1);
        if (word_char(s, before))
            return 0;
        if (before == '\'' && first > 1 && word_char(s, PyUnicode_READ(kind, data, first - 2)))
            return 0;
    }
    if ((flags & E_RIGHT) && last < len && word_char(s, PyUnicode_READ(kind, data, last)))
        return 0;
    if (separated && (flags & E_LETTERS)) {
        for (Py_ssize_t i = first; i < last; i++)
            if (Py_UNICODE_ISALPHA(PyUnicode_READ(kind, data, i)))
                return 1;
        return 0;
    }
    return 1;
}

/* find_personal can only find something with an ASCII '@' (e-mail) or six digits
 * or more, consecutive ones at most one character apart (phones, cards, ids). */
static int
may_hold_personal(const Scanner *s, int kind, const void *data, Py_ssize_t len)
{
    Py_ssize_t run = 0, gap = 2;
    for (Py_ssize_t i = 0; i < len; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c == '@')
            return 1;
        int digit = c < TABLE_SIZE ? (s->flags[c] & F_DIGIT) != 0 : Py_UNICODE_ISDIGIT(c);
        if (digit) {
            if (gap > 1)
                run = 0;
            run++;
            gap = 0;
            if (run >= 6)
                return 1;
        }
        else
            gap++;
    }
    return 0;
}

static int
get_ll(PyObject *o, long long *v)
{
#if PY_VERSION_HEX < 0x030C0000
    /* the recent entries' ms timestamps and CRCs take two 30-bit digits, where
     * PyLong_AsLongLong leaves its fast path: read them directly (3.11 layout) */
    if (PyLong_CheckExact(o) && Py_SIZE(o) >= 0 && Py_SIZE(o) <= 2 && PyLong_SHIFT == 30) {
        const digit *d = ((PyLongObject *)o)->ob_digit;
        Py_ssize_t n = Py_SIZE(o);
        *v = n == 0 ? 0 : n == 1 ? (long long)d[0] : (long long)d[0] | ((long long)d[1] << 30);
        return 0;
    }
#endif
    *v = PyLong_AsLongLong(o);
    return (*v == -1 && PyErr_Occurred()) ? -1 : 0;
}

typedef struct {
    PyObject *cat; /* borrowed from the automaton's categories */
    uint8_t action;
    Py_ssize_t first, last;
} Span;

/* one pass over a text: what the loop accumulates */
typedef struct {
    const Scanner *self;
    int kind;
    const void *data;
    Py_ssize_t len;
    int32_t *pos; /* normalised index -> original index */
    unsigned char *u8;
    int spam, need_fp;
    size_t u8n;
    long ascii_digits;
    int hint; /* an '@', a full-width digit or '@' */
    long long links;
    Span *spans; /* accepted word hits */
    Py_ssize_t nspans, cap;
    Span stack[16];
} Pass;

/* Every pattern ending at normalised length j in automaton k's state st: map back to
 * the original span, apply the entries' boundary rules, keep the accepted ones. */
static int
emit(Pass *ps, int k, int32_t st, Py_ssize_t j)
{
    const Scanner *self = ps->self;
    const Automaton *a = self->autos[k];
    for (int32_t r = a->states[st].report; r >= 0; r = a->dict[r]) {
        int32_t p = a->out[r];
        int32_t plen = a->plen[p];
        Py_ssize_t first = ps->pos[j - plen], last = (Py_ssize_t)ps->pos[j - 1] + 1;
        int separated = (last - first) != plen;
        const Entry *e = a->entries + a->ent_start[p];
        const uint8_t *on = self->enabled[k] + a->ent_start[p];
        for (uint32_t x = 0; x < a->ent_count[p]; x++) {
            if (!on[x] ||
                !accepts(self, e[x].flags, ps->kind, ps->data, ps->len, first, last, separated))
                continue;
            if (ps->nspans == ps->cap) {
                Py_ssize_t cap = ps->cap * 2;
                Span *grown = ps->spans == ps->stack ? PyMem_Malloc(cap * sizeof(Span))
                                                     : PyMem_Realloc(ps->spans, cap * sizeof(Span));
                if (!grown) {
                    PyErr_NoMemory();
                    return -1;
                }
                if (ps->spans == ps->stack)
                    memcpy(grown, ps->stack, sizeof(ps->stack));
                ps->spans = grown;
                ps->cap = cap;
            }
            Span *sp = &ps->spans[ps->nspans++];
            sp->cat = PyTuple_GET_ITEM(a->categories, e[x].cat);
            sp->action = self->action[k][e[x].cat];
            sp->first = first;
            sp->last = last;
        }
    }
    return 0;
}

/* The loop, once per string kind so the character read is a plain load. */
#define DEFINE_PASS(NAME, T)                                                            \
    static int NAME(Pass *ps)                                                           \
    {                                                                                   \
        const Scanner *self = ps->self;                                                 \
        const T *text = (const T *)ps->data;                                            \
        const uint32_t *norm = self->norm;                                              \
        const int na = self->n;                                                         \
        int32_t states[MAX_AUTOMATA] = {0};                                             \
        uint32_t prev[MAX_AUTOMATA] = {0};                                              \
        int32_t *pos = ps->pos;                                                         \
        Py_ssize_t j = 0;                                                               \
        const uint8_t *fl = self->flags;                                                \
        long ascii_digits = 0;                                                          \
        uint32_t hint = 0;                                                              \
        int http = 0, www = 0;                                                          \
        long long links = 0;                                                            \
        size_t u8n = 0;                                                                 \
        for (Py_ssize_t i = 0; i < ps->len; i++) {                                      \
            uint32_t cp = text[i];                                                      \
            uint32_t m = cp;                                                            \
            if (cp < TABLE_SIZE) {                                                      \
                /* branch-free: text mixes scripts, a branch per kind mispredicts */   \
                uint32_t f = fl[cp];                                                    \
                ascii_digits += (f & F_ASCII_DIGIT) >> 2;                               \
                hint |= f;                                                              \
                m = norm[cp];                                                           \
                if (m == DROP)                                                          \
                    continue;                                                           \
            }                                                                           \
            pos[j++] = (int32_t)i;                                                      \
            if (ps->spam) {                                                             \
                /* str.count("http") + str.count("www"): non-overlapping */             \
                if (m == (uint32_t)"http"[http]) {                                      \
                    if (++http == 4) {                                                  \
                        links++;                                                        \
                        http = 0;                                                       \
                    }                                                                   \
                }                                                                       \
                else                                                                    \
                    http = m == 'h';                                                    \
                if (m == 'w') {                                                         \
                    if (++www == 3) {                                                   \
                        links++;                                                        \
                        www = 0;                                                        \
                    }                                                                   \
                }                                                                       \
                else                                                                    \
                    www = 0;                                                            \
                if (ps->need_fp)                                                        \
                    u8n += utf8_put(ps->u8 + u8n, m);                                   \
            }                                                                           \
            for (int k = 0; k < na; k++) {                                              \
                const Automaton *a = self->autos[k];                                    \
                uint32_t c = class_of(a, m);                                            \
                uint32_t pc = prev[k];                                                  \
                prev[k] = c;                                                            \
                if (!c) {                                                               \
                    states[k] = 0;                                                      \
                    continue;                                                           \
                }                                                                       \
                int32_t st;                                                             \
                int out;                                                                \
                if (!pc || !pair_maybe(a, pc, c)) {                                     \
                    /* no pattern has this pair: the root's transition */              \
                    st = a->root_next[c];                                               \
                    out = a->root_out[c];                                               \
                }                                                                       \
                else {                                                                  \
                    st = step(a, states[k], c);                                         \
                    out = a->states[st].report >= 0;                                    \
                }                                                                       \
                states[k] = st;                                                         \
                if (out && emit(ps, k, st, j) < 0)                                      \
                    return -1;                                                          \
            }                                                                           \
        }                                                                               \
        ps->u8n = u8n;                                                                  \
        ps->ascii_digits = ascii_digits;                                                \
        ps->hint = (hint & F_HINT) != 0;                                                \
        ps->links = links;                                                              \
        return 0;                                                                       \
    }

DEFINE_PASS(pass_ucs1, Py_UCS1)
DEFINE_PASS(pass_ucs2, Py_UCS2)
DEFINE_PASS(pass_ucs4, Py_UCS4)

static PyObject *
new_verdict(const Scanner *self, PyObject *action, PyObject *text, PyObject *categories)
{
    PyTypeObject *vt = (PyTypeObject *)self->verdict_cls;
    PyObject *v = vt->tp_alloc(vt, 4);
    if (!v)
        return NULL;
    Py_INCREF(action);
    PyTuple_SET_ITEM(v, 0, action);
    Py_INCREF(text);
    PyTuple_SET_ITEM(v, 1, text);
    Py_INCREF(categories);
    PyTuple_SET_ITEM(v, 2, categories);
    Py_INCREF(self->version);
    PyTuple_SET_ITEM(v, 3, self->version);
    return v;
}

/* streams.moderation._verdict for word hits alone (no personal data, no spam): the
 * categories sorted, the strongest action, each hit of a masking category (every hit
 * when blocking) replaced by as many '*'. None: too many categories, Python's turn.
 * The actions tuple is ("pass", "flag", "mask", "block"). */
static PyObject *
word_verdict(const Scanner *self, PyObject *text, const Pass *ps)
{
    PyObject *cats[32];
    uint8_t acts[32];
    Py_ssize_t ncats = 0;
    uint8_t strongest = 0;
    for (Py_ssize_t i = 0; i < ps->nspans; i++) {
        PyObject *cat = ps->spans[i].cat;
        Py_ssize_t c = 0;
        for (; c < ncats; c++) {
            if (cats[c] == cat)
                break;
            int eq = PyUnicode_Compare(cats[c], cat);
            if (eq == -1 && PyErr_Occurred())
                return NULL;
            if (eq == 0)
                break;
        }
        if (c == ncats) {
            if (ncats == 32) /* unusual: let Python do it */
                Py_RETURN_NONE;
            /* insertion, sorted */
            Py_ssize_t at = ncats;
            while (at > 0) {
                int cmp = PyUnicode_Compare(cats[at - 1], cat);
                if (cmp == -1 && PyErr_Occurred())
                    return NULL;
                if (cmp < 0)
                    break;
                cats[at] = cats[at - 1];
                acts[at] = acts[at - 1];
                at--;
            }
            cats[at] = cat;
            acts[at] = ps->spans[i].action;
            ncats++;
        }
        if (ps->spans[i].action > strongest)
            strongest = ps->spans[i].action;
    }
    Py_ssize_t nactions = PyTuple_GET_SIZE(self->actions);
    int mask_code = nactions > 2 ? 2 : -1, block_code = nactions > 3 ? 3 : -1;
    PyObject *categories = PyTuple_New(ncats);
    if (!categories)
        return NULL;
    for (Py_ssize_t c = 0; c < ncats; c++) {
        Py_INCREF(cats[c]);
        PyTuple_SET_ITEM(categories, c, cats[c]);
    }
    Py_ssize_t len = PyUnicode_GET_LENGTH(text);
    PyObject *out = NULL;
    for (Py_ssize_t i = 0; i < ps->nspans; i++) {
        const Span *sp = &ps->spans[i];
        if (!(strongest == block_code || sp->action == mask_code))
            continue;
        if (!out) {
            Py_UCS4 maxchar = PyUnicode_MAX_CHAR_VALUE(text);
            out = PyUnicode_New(len, maxchar < '*' ? '*' : maxchar);
            if (!out || PyUnicode_CopyCharacters(out, 0, text, 0, len) < 0) {
                Py_XDECREF(out);
                Py_DECREF(categories);
                return NULL;
            }
        }
        int kind = PyUnicode_KIND(out);
        void *data = PyUnicode_DATA(out);
        for (Py_ssize_t j = sp->first; j < sp->last; j++)
            PyUnicode_WRITE(kind, data, j, '*');
    }
    if (out) {
        /* a str must use its narrowest kind: the masked characters may have been the
         * only wide ones ("you ｉｄｉｏｔ" -> "you *****") */
        PyObject *canonical =
            PyUnicode_FromKindAndData(PyUnicode_KIND(out), PyUnicode_DATA(out), len);
        Py_DECREF(out);
        if (!canonical) {
            Py_DECREF(categories);
            return NULL;
        }
        out = canonical;
    }
    PyObject *v = new_verdict(self, PyTuple_GET_ITEM(self->actions, strongest), out ? out : text,
                              categories);
    Py_XDECREF(out);
    Py_DECREF(categories);
    return v;
}

/* A sender's recent entries (at, fingerprint, links), read once. ok = 0: something
 * unusual (not tuples or lists of three ints, or many): the generic loop reads them. */
typedef struct {
    int ok;
    Py_ssize_t n;
    long long at[32], fp[32], links[32];
} Recent;

static void
read_recent(PyObject *fast, Py_ssize_t n, Recent *r)
{
    r->ok = 0;
    r->n = n;
    if (n > 32)
        return;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!(PyTuple_CheckExact(item) || PyList_CheckExact(item)) ||
            PySequence_Fast_GET_SIZE(item) != 3)
            return;
        if (get_ll(PySequence_Fast_GET_ITEM(item, 0), &r->at[i]) < 0 ||
            get_ll(PySequence_Fast_GET_ITEM(item, 1), &r->fp[i]) < 0 ||
            get_ll(PySequence_Fast_GET_ITEM(item, 2), &r->links[i]) < 0) {
            PyErr_Clear();
            return;
        }
    }
    r->ok = 1;
}

/* Whether the text's fingerprint can change the verdict. The repeat rule fires when
 * repeats - 1 recent entries in the window carry the text's fingerprint, so unless that
 * many of them share one fingerprint, whatever the text's is, it cannot fire: then
 * the UTF-8 copy and its CRC are not worth making (a sender's messages usually
 * differ). Anything unusual: needed (the generic loop later raises what it must). */
static int
fingerprint_needed(const Scanner *self, const Recent *r, long long now)
{
    long long fps[32];
    int m = 0;
    if (self->repeats <= 2 || !r->ok)
        return 1;
    for (Py_ssize_t i = 0; i < r->n; i++)
        if (now - r->at[i] <= self->repeat_window)
            fps[m++] = r->fp[i];
    for (int a = 0; a < m; a++) {
        long long count = 1;
        for (int b = a + 1; b < m; b++)
            count += fps[b] == fps[a];
        if (count >= self->repeats - 1)
            return 1;
    }
    return 0;
}

/* The pass Verdict, or (spans, personal?, spam?) where spans is None or a list of
 * (category, start, end) on the original text. */
static PyObject *
scan(Scanner *self, PyObject *text, PyObject *recent, PyObject *now_obj)
{
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "text must be str");
        return NULL;
    }
    if (!self->refs) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner not initialised");
        return NULL;
    }
    long long now = 0;
    int spam = self->spam_on && recent != Py_None;
    PyObject *recent_fast = NULL;
    Py_ssize_t nrecent = 0;
    if (spam) {
        if (get_ll(now_obj, &now) < 0)
            return NULL;
        recent_fast = PySequence_Fast(recent, "recent must be a sequence");
        if (!recent_fast)
            return NULL;
        nrecent = PySequence_Fast_GET_SIZE(recent_fast);
    }
    Recent rec;
    rec.ok = 0;
    if (spam && nrecent > 0)
        read_recent(recent_fast, nrecent, &rec);
    int need_fp = spam && nrecent > 0 && fingerprint_needed(self, &rec, now);
    Py_ssize_t len = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    int32_t pos_stack[STACK_CHARS];
    unsigned char u8_stack[STACK_CHARS * 4];
    int32_t *pos = pos_stack;
    unsigned char *u8 = u8_stack;
    PyObject *result = NULL;
    Pass ps = {0};
    ps.spans = ps.stack;
    ps.cap = sizeof(ps.stack) / sizeof(Span);
    if (len > STACK_CHARS) {
        if (len > INT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "text too long");
            goto done;
        }
        pos = PyMem_Malloc((size_t)len * sizeof(int32_t));
        u8 = need_fp ? PyMem_Malloc((size_t)len * 4) : NULL;
        if (!pos || (need_fp && !u8)) {
            PyErr_NoMemory();
            goto done;
        }
    }
    ps.self = self;
    ps.kind = kind;
    ps.data = data;
    ps.len = len;
    ps.pos = pos;
    ps.u8 = u8;
    ps.spam = spam;
    ps.need_fp = need_fp;
    int rc;
    switch (kind) {
    case PyUnicode_1BYTE_KIND:
        rc = pass_ucs1(&ps);
        break;
    case PyUnicode_2BYTE_KIND:
        rc = pass_ucs2(&ps);
        break;
    default:
        rc = pass_ucs4(&ps);
        break;
    }
    if (rc < 0)
        goto done;
    long long links = ps.links;
    size_t u8n = ps.u8n;
    long ascii_digits = ps.ascii_digits;
    int personal = self->personal_on && (ascii_digits >= 7 || ps.hint) &&
                   may_hold_personal(self, kind, data, len);
    int is_spam = 0;
    if (spam) {
        if (links >= self->links)
            is_spam = 1;
        else if (nrecent > 0) {
            long long fp = need_fp ? (long long)crc32_of(u8, u8n) : 0;
            long long repeats = 1;
            for (Py_ssize_t r = 0; rec.ok && r < nrecent; r++) {
                if (need_fp && rec.fp[r] == fp && now - rec.at[r] <= self->repeat_window)
                    repeats++;
                if (links && now - rec.at[r] <= self->link_window)
                    links += rec.links[r];
            }
            for (Py_ssize_t r = 0; !rec.ok && r < nrecent; r++) {
                PyObject *item = PySequence_Fast_GET_ITEM(recent_fast, r);
                if (PyTuple_CheckExact(item))
                    Py_INCREF(item);
                else
                    item = PySequence_Fast(item, "recent entries must be sequences");
                if (!item)
                    goto done;
                long long at, f, nl;
                if (PySequence_Fast_GET_SIZE(item) != 3) {
                    PyErr_SetString(PyExc_ValueError, "recent entries: (at, fingerprint, links)");
                    Py_DECREF(item);
                    goto done;
                }
                if (get_ll(PySequence_Fast_GET_ITEM(item, 0), &at) < 0 ||
                    get_ll(PySequence_Fast_GET_ITEM(item, 1), &f) < 0 ||
                    get_ll(PySequence_Fast_GET_ITEM(item, 2), &nl) < 0) {
                    Py_DECREF(item);
                    goto done;
                }
                Py_DECREF(item);
                if (need_fp && f == fp && now - at <= self->repeat_window)
                    repeats++;
                if (links && now - at <= self->link_window)
                    links += nl;
            }
            is_spam = repeats >= self->repeats || links >= self->links;
        }
    }
    if (ps.nspans && !personal && !is_spam) {
        result = word_verdict(self, text, &ps);
        if (result != Py_None)
            goto done;
        Py_DECREF(result);
        result = NULL;
    }
    if (!ps.nspans && !personal && !is_spam) {
        PyTypeObject *vt = (PyTypeObject *)self->verdict_cls;
        result = vt->tp_alloc(vt, 4);
        if (!result)
            goto done;
        Py_INCREF(self->pass_str);
        PyTuple_SET_ITEM(result, 0, self->pass_str);
        Py_INCREF(text);
        PyTuple_SET_ITEM(result, 1, text);
        Py_INCREF(self->empty);
        PyTuple_SET_ITEM(result, 2, self->empty);
        Py_INCREF(self->version);
        PyTuple_SET_ITEM(result, 3, self->version);
    }
    else {
        PyObject *spans = Py_None;
        Py_INCREF(spans);
        if (ps.nspans) {
            Py_DECREF(spans);
            spans = PyList_New(ps.nspans);
            if (!spans)
                goto done;
            for (Py_ssize_t i = 0; i < ps.nspans; i++) {
                PyObject *span =
                    Py_BuildValue("(Onn)", ps.spans[i].cat, ps.spans[i].first, ps.spans[i].last);
                if (!span) {
                    Py_DECREF(spans);
                    goto done;
                }
                PyList_SET_ITEM(spans, i, span);
            }
        }
        result = Py_BuildValue("(NOO)", spans, personal ? Py_True : Py_False,
                               is_spam ? Py_True : Py_False);
    }
done:
    if (ps.spans != ps.stack)
        PyMem_Free(ps.spans);
    Py_XDECREF(recent_fast);
    if (pos != pos_stack)
        PyMem_Free(pos);
    if (u8 != u8_stack)
        PyMem_Free(u8);
    return result;
}

/* scan(text, recent, now): the pass Verdict, or (spans, personal?, spam?) */
static PyObject *
scanner_scan(Scanner *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "scan(text, recent, now)");
        return NULL;
    }
    return scan(self, args[0], args[1], args[2]);
}

/* the Verdict: the pass one from here, any other from on_found */
static PyObject *
scanner_verdict(Scanner *self, PyObject *text, PyObject *recent, PyObject *now)
{
    PyObject *found = scan(self, text, recent, now);
    if (!found || Py_TYPE(found) == (PyTypeObject *)self->verdict_cls)
        return found;
    PyObject *call[4] = {text, PyTuple_GET_ITEM(found, 0), PyTuple_GET_ITEM(found, 1),
                         PyTuple_GET_ITEM(found, 2)};
    PyObject *verdict = PyObject_Vectorcall(self->on_found, call, 4, NULL);
    Py_DECREF(found);
    return verdict;
}

static PyMethodDef scanner_methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scanner_scan, METH_FASTCALL,
     "scan(text, recent, now): the pass Verdict, or (spans, personal?, spam?)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "streams._moderation_c.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One tenant view's automata, tables and actions: the check in one pass.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)scanner_init,
    .tp_dealloc = (destructor)scanner_dealloc,
    .tp_traverse = (traverseproc)scanner_traverse,
    .tp_clear = (inquiry)scanner_clear,
    .tp_methods = scanner_methods,
};

/* --------------------------------------------------------------- the dispatch */

/* Moderator.check itself: check(text, tenant_id="", *, recent=None, now=0). Picks the
 * tenant's Scanner (or the shared one) and returns its Verdict, in one C call. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *shared;  /* Scanner */
    PyObject *tenants; /* dict: tenant id -> Scanner */
} Dispatch;

static PyTypeObject DispatchType;
static PyObject *kw_recent, *kw_now, *kw_tenant_id, *kw_text; /* interned */

/* the keyword's slot: pointer equality first (call sites pass interned names) */
static int
kw_is(PyObject *name, PyObject *interned)
{
    return name == interned || PyUnicode_Compare(name, interned) == 0;
}

static int
dispatch_set(Dispatch *d, PyObject *shared, PyObject *tenants)
{
    if (!PyObject_TypeCheck(shared, &ScannerType) || !PyDict_Check(tenants)) {
        PyErr_SetString(PyExc_TypeError, "Dispatch(shared: Scanner, tenants: dict)");
        return -1;
    }
    Py_INCREF(shared);
    Py_INCREF(tenants);
    /* swap both, then release the old: a check in progress holds its own references */
    PyObject *old_shared = d->shared, *old_tenants = d->tenants;
    d->shared = shared;
    d->tenants = tenants;
    Py_XDECREF(old_shared);
    Py_XDECREF(old_tenants);
    return 0;
}

static PyObject *
dispatch_call(Dispatch *d, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *text = NULL, *tenant = NULL, *recent = Py_None, *now = NULL;
    if (nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "check(text, tenant_id='', *, recent=None, now=0)");
        return NULL;
    }
    if (nargs > 0)
        text = args[0];
    if (nargs > 1)
        tenant = args[1];
    if (kwnames) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i), *value = args[nargs + i];
            PyObject **slot = NULL;
            if (kw_is(name, kw_recent))
                slot = &recent;
            else if (kw_is(name, kw_now))
                slot = &now;
            else if (kw_is(name, kw_tenant_id) && !tenant)
                slot = &tenant;
            else if (kw_is(name, kw_text) && !text)
                slot = &text;
            if (!slot) {
                PyErr_Format(PyExc_TypeError, "check() got an unexpected keyword argument %R",
                             name);
                return NULL;
            }
            *slot = value;
        }
    }
    if (!text) {
        PyErr_SetString(PyExc_TypeError, "check() missing the text");
        return NULL;
    }
    if (!d->shared) {
        PyErr_SetString(PyExc_RuntimeError, "Dispatch not initialised");
        return NULL;
    }
    PyObject *scanner = NULL;
    if (tenant && PyDict_GET_SIZE(d->tenants)) {
        scanner = PyDict_GetItemWithError(d->tenants, tenant);
        if (!scanner && PyErr_Occurred())
            return NULL;
    }
    if (!scanner)
        scanner = d->shared;
    Py_INCREF(scanner);
    PyObject *zero = NULL;
    if (!now) {
        zero = PyLong_FromLong(0);
        if (!zero) {
            Py_DECREF(scanner);
            return NULL;
        }
        now = zero;
    }
    PyObject *verdict = scanner_verdict((Scanner *)scanner, text, recent, now);
    Py_XDECREF(zero);
    Py_DECREF(scanner);
    return verdict;
}

static PyObject *
dispatch_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Dispatch *d = (Dispatch *)type->tp_alloc(type, 0);
    if (d)
        d->vectorcall = (vectorcallfunc)dispatch_call;
    return (PyObject *)d;
}

static int
dispatch_init(Dispatch *d, PyObject *args, PyObject *kwds)
{
    PyObject *shared, *tenants;
    if (kwds && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Dispatch takes positional arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OO", &shared, &tenants))
        return -1;
    return dispatch_set(d, shared, tenants);
}

static PyObject *
dispatch_update(Dispatch *d, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "update(shared, tenants)");
        return NULL;
    }
    if (dispatch_set(d, args[0], args[1]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int
dispatch_traverse(Dispatch *d, visitproc visit, void *arg)
{
    Py_VISIT(d->shared);
    Py_VISIT(d->tenants);
    return 0;
}

static int
dispatch_clear(Dispatch *d)
{
    Py_CLEAR(d->shared);
    Py_CLEAR(d->tenants);
    return 0;
}

static void
dispatch_dealloc(Dispatch *d)
{
    PyObject_GC_UnTrack(d);
    dispatch_clear(d);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static PyMethodDef dispatch_methods[] = {
    {"update", (PyCFunction)(void (*)(void))dispatch_update, METH_FASTCALL,
     "update(shared, tenants): swap the scanners (a list change)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DispatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "streams._moderation_c.Dispatch",
    .tp_basicsize = sizeof(Dispatch),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Moderator.check: the tenant's Scanner, its Verdict.",
    .tp_new = dispatch_new,
    .tp_init = (initproc)dispatch_init,
    .tp_dealloc = (destructor)dispatch_dealloc,
    .tp_traverse = (traverseproc)dispatch_traverse,
    .tp_clear = (inquiry)dispatch_clear,
    .tp_methods = dispatch_methods,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Dispatch, vectorcall),
};

/* --------------------------------------------------------------- module level */

/* sender_stats(text, norm): (zlib.crc32 of the normalised text's UTF-8, links in it) */
static PyObject *
sender_stats(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyBytes_Check(args[1]) ||
        PyBytes_GET_SIZE(args[1]) != TABLE_SIZE * 4) {
        PyErr_SetString(PyExc_TypeError, "sender_stats(text: str, norm: bytes)");
        return NULL;
    }
    PyObject *text = args[0];
    const uint32_t *norm = (const uint32_t *)PyBytes_AS_STRING(args[1]);
    Py_ssize_t len = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    unsigned char stack[STACK_CHARS * 4];
    unsigned char *u8 = len > STACK_CHARS ? PyMem_Malloc((size_t)len * 4) : stack;
    if (!u8)
        return PyErr_NoMemory();
    size_t n = 0;
    long long links = 0;
    int http = 0, www = 0;
    static const char HTTP[] = "http";
    for (Py_ssize_t i = 0; i < len; i++) {
        uint32_t m = PyUnicode_READ(kind, data, i);
        if (m < TABLE_SIZE) {
            m = norm[m];
            if (m == DROP)
                continue;
        }
        if (m == (uint32_t)HTTP[http]) {
            if (++http == 4) {
                links++;
                http = 0;
            }
        }
        else
            http = m == 'h';
        if (m == 'w') {
            if (++www == 3) {
                links++;
                www = 0;
            }
        }
        else
            www = 0;
        n += utf8_put(u8 + n, m);
    }
    uint32_t crc = crc32_of(u8, n);
    if (u8 != stack)
        PyMem_Free(u8);
    return Py_BuildValue("(kL)", (unsigned long)crc, links);
}

static PyMethodDef module_methods[] = {
    {"sender_stats", (PyCFunction)(void (*)(void))sender_stats, METH_FASTCALL,
     "(crc32 of the normalised UTF-8, links) of a text."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "streams._moderation_c",
    "Moderation's hot path: normalise and match in one pass.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__moderation_c(void)
{
    crc_init();
    kw_recent = PyUnicode_InternFromString("recent");
    kw_now = PyUnicode_InternFromString("now");
    kw_tenant_id = PyUnicode_InternFromString("tenant_id");
    kw_text = PyUnicode_InternFromString("text");
    if (!kw_recent || !kw_now || !kw_tenant_id || !kw_text)
        return NULL;
    if (PyType_Ready(&AutomatonType) < 0 || PyType_Ready(&ScannerType) < 0 ||
        PyType_Ready(&DispatchType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Py_INCREF(&AutomatonType);
    if (PyModule_AddObject(m, "Automaton", (PyObject *)&AutomatonType) < 0) {
        Py_DECREF(&AutomatonType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ScannerType);
    if (PyModule_AddObject(m, "Scanner", (PyObject *)&ScannerType) < 0) {
        Py_DECREF(&ScannerType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&DispatchType);
    if (PyModule_AddObject(m, "Dispatch", (PyObject *)&DispatchType) < 0) {
        Py_DECREF(&DispatchType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "TABLE_SIZE", TABLE_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "DROP", (long)DROP) < 0 ||
        PyModule_AddIntConstant(m, "F_WORD", F_WORD) < 0 ||
        PyModule_AddIntConstant(m, "F_DIGIT", F_DIGIT) < 0 ||
        PyModule_AddIntConstant(m, "F_ASCII_DIGIT", F_ASCII_DIGIT) < 0 ||
        PyModule_AddIntConstant(m, "F_HINT", F_HINT) < 0 ||
        PyModule_AddIntConstant(m, "E_LEFT", E_LEFT) < 0 ||
        PyModule_AddIntConstant(m, "E_RIGHT", E_RIGHT) < 0 ||
        PyModule_AddIntConstant(m, "E_LETTERS", E_LETTERS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
