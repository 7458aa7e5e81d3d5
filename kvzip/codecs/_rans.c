/* kvzip's rANS coder for the "rans" entropy layout (see kvzip/codecs/entropy.py).
 *
 * A symbol matrix is coded cluster by cluster: a cluster is a list of rows that
 * share one quantised frequency table (span_h values, summing to 1 << PREC).
 * Element j of the chunk's coded stream (clusters in order, rows in order, tokens
 * in order) is coded by interleaved state j % LANES.  A value v of a row decodes as
 *     v = ((h << raw) | low) + lo + center[row]
 * where h is coded with the cluster's table and, for raw > 0, low with a uniform
 * table over 1 << raw values, right after h.
 *
 * Bitstream: 32-bit states in [L, 2**32) with L = 2**16, renormalised 16 bits at a
 * time into one shared stream of little-endian uint16 words.  The stream opens with
 * the LANES final encoder states (low half first), then the words in the order the
 * decoder reads them.  A decoder that ends with every state back at L and every word
 * read has decoded exactly what was encoded (the rANS end-state check).
 *
 * Both directions run without the GIL, so two threads decode two chunks at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define LANES 4
#define RANS_L (1u << 16)
#define PREC 12
#define TOTAL (1u << PREC)
#define MAX_SPAN_H (TOTAL >> 1)
#define MAX_RAW 8

static inline uint32_t rd16(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8);
}

/* The decoder's renormalisation: below RANS_L a state takes in the next word (one is
 * always enough: a decoded state is at least 2**(16 - PREC) = 16, and 16 more bits lift
 * it past 2**20); -1 when the stream has none left. */
static inline int renorm(uint32_t *x, const unsigned char **w, const unsigned char *wend)
{
    if (*x >= RANS_L)
        return 0;
    if (*w >= wend)
        return -1;
    *x = (*x << 16) | rd16(*w);
    *w += 2;
    return 0;
}

/* Store the low 16 bits of v little-endian just below p; returns the new position. */
static inline unsigned char *wr16(unsigned char *p, uint32_t v)
{
    p[-2] = (unsigned char)v;
    p[-1] = (unsigned char)(v >> 8);
    return p - 2;
}

typedef struct {
    uint16_t freq, bias, sym, pad;
} slot_t;

/* One cluster's parameters, a row of the int64 [nc, 6] array both calls take. */
enum { P_SPAN_H, P_FOFF, P_RAW, P_NROWS, P_ROW0, P_LO, P_COLS };

static const char *check_params(const int64_t *params, Py_ssize_t nc, Py_ssize_t nrows_total, Py_ssize_t nfreq)
{
    Py_ssize_t rows_seen = 0;
    for (Py_ssize_t c = 0; c < nc; c++) {
        const int64_t *p = params + c * P_COLS;
        if (p[P_SPAN_H] < 2 || p[P_SPAN_H] > MAX_SPAN_H || p[P_RAW] < 0 || p[P_RAW] > MAX_RAW)
            return "invalid cluster model";
        if (p[P_FOFF] < 0 || p[P_FOFF] > nfreq - p[P_SPAN_H]) /* no overflow: span_h <= MAX_SPAN_H */
            return "cluster table out of range";
        if (p[P_NROWS] < 1 || p[P_ROW0] != rows_seen || p[P_NROWS] > nrows_total - p[P_ROW0]) /* no overflow */
            return "cluster rows out of range";
        if (p[P_LO] < -(1LL << 31) || p[P_LO] >= (1LL << 31))
            return "cluster window out of range";
        rows_seen += p[P_NROWS];
    }
    return NULL;
}

/* The sizes both directions derive from their buffers, checked: ``data`` is the
 * [g, n] int32 matrix (encode) or output (decode), g = the number of row centres. */
static const char *check_block(const Py_buffer *params, const Py_buffer *rows, const Py_buffer *center,
                               const Py_buffer *freqs, const Py_buffer *data, Py_ssize_t n, Py_ssize_t *nc,
                               Py_ssize_t *g)
{
    *nc = params->len / (Py_ssize_t)(P_COLS * sizeof(int64_t));
    *g = center->len / (Py_ssize_t)sizeof(int32_t);
    /* g * n * 4 is compared only once it cannot overflow (a wrapped product could match
     * a short buffer, and rows would then be written or read far outside it) */
    if (n < 1 || *g > PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(int32_t) / n
        || data->len != *g * n * (Py_ssize_t)sizeof(int32_t))
        return "symbol matrix has the wrong size";
    return check_params((const int64_t *)params->buf, *nc, rows->len / (Py_ssize_t)sizeof(int32_t),
                        freqs->len / (Py_ssize_t)sizeof(uint16_t));
}

/* Cumulative table of one cluster; NULL when the frequencies do not sum to TOTAL. */
static int cum_table(const uint16_t *freq, int64_t span_h, uint32_t *cum)
{
    uint32_t acc = 0;
    for (int64_t s = 0; s < span_h; s++) {
        if (freq[s] == 0)
            return -1;
        cum[s] = acc;
        acc += freq[s];
    }
    cum[span_h] = acc;
    return acc == TOTAL ? 0 : -1;
}

/* Release ``n`` buffers, then: ``result`` when ``err`` is NULL, else a ValueError(err)
 * (and ``result``, if any, dropped).  Every entry point ends here. */
static PyObject *finish(const char *err, PyObject *result, int n, ...)
{
    va_list bufs;
    va_start(bufs, n);
    for (int i = 0; i < n; i++)
        PyBuffer_Release(va_arg(bufs, Py_buffer *));
    va_end(bufs);
    if (err) {
        Py_XDECREF(result);
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return result;
}

static PyObject *rans_decode(PyObject *self, PyObject *args)
{
    Py_buffer words, freqs, params, rows, center, out;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*w*n", &words, &freqs, &params, &rows, &center, &out, &n))
        return NULL;
    const char *err = NULL;
    slot_t *table = NULL;
    uint32_t *cum = NULL;
    Py_ssize_t nc, g, nwords = words.len / (Py_ssize_t)sizeof(uint16_t);
    err = check_block(&params, &rows, &center, &freqs, &out, n, &nc, &g);
    if (err)
        goto done;
    table = (slot_t *)malloc(TOTAL * sizeof(slot_t));
    cum = (uint32_t *)malloc((MAX_SPAN_H + 1) * sizeof(uint32_t));
    if (!table || !cum) {
        err = "out of memory";
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    /* words are read byte by byte: little-endian on every machine, and the stream
     * may start at any offset of its payload (no alignment) */
    const unsigned char *w = (const unsigned char *)words.buf;
    const unsigned char *wend = w + 2 * nwords;
    const int64_t *par = (const int64_t *)params.buf;
    const int32_t *rws = (const int32_t *)rows.buf;
    const int32_t *ctr = (const int32_t *)center.buf;
    int32_t *dst = (int32_t *)out.buf;
    const uint16_t *fq = (const uint16_t *)freqs.buf;
    uint32_t x[LANES];
    unsigned lane = 0;
    if (nwords < 2 * LANES) {
        err = "coded stream is truncated";
        goto unlock;
    }
    for (int k = 0; k < LANES; k++) {
        x[k] = rd16(w) | ((uint32_t)rd16(w + 2) << 16);
        w += 4;
    }
    for (Py_ssize_t c = 0; c < nc && !err; c++) {
        const int64_t *p = par + c * P_COLS;
        int64_t span_h = p[P_SPAN_H];
        unsigned raw = (unsigned)p[P_RAW];
        if (cum_table(fq + p[P_FOFF], span_h, cum)) {
            err = "cluster table does not sum to its total";
            break;
        }
        for (int64_t s = 0; s < span_h; s++) {
            uint16_t f = (uint16_t)(cum[s + 1] - cum[s]);
            for (uint32_t j = 0; j < f; j++) {
                slot_t *e = &table[cum[s] + j];
                e->freq = f;
                e->bias = (uint16_t)j;
                e->sym = (uint16_t)s;
            }
        }
        const unsigned low_shift = PREC - raw;
        const uint32_t low_mask = (1u << raw) - 1;
        for (int64_t r = 0; r < p[P_NROWS] && !err; r++) {
            int32_t row = rws[p[P_ROW0] + r];
            if (row < 0 || row >= g) {
                err = "cluster rows out of range";
                break;
            }
            const int64_t base = p[P_LO] + (int64_t)ctr[row]; /* int64: no overflow on hostile side info */
            int32_t *o = dst + (Py_ssize_t)row * n;
            for (Py_ssize_t t = 0; t < n; t++) {
                uint32_t xs = x[lane];
                uint32_t slot = xs & (TOTAL - 1);
                slot_t e = table[slot];
                xs = (uint32_t)e.freq * (xs >> PREC) + e.bias;
                if (renorm(&xs, &w, wend)) {
                    err = "coded stream is truncated";
                    break;
                }
                uint32_t v = e.sym;
                if (raw) {
                    uint32_t ls = xs & (TOTAL - 1);
                    uint32_t low = ls >> low_shift;
                    xs = ((xs >> PREC) << low_shift) + (ls & ((1u << low_shift) - 1));
                    if (renorm(&xs, &w, wend)) {
                        err = "coded stream is truncated";
                        break;
                    }
                    v = (v << raw) | (low & low_mask);
                }
                x[lane] = xs;
                lane = (lane + 1) & (LANES - 1);
                o[t] = (int32_t)((int64_t)v + base);
            }
        }
    }
    if (!err) {
        for (int k = 0; k < LANES; k++)
            if (x[k] != RANS_L)
                err = "coded stream does not end where it should (corrupt)";
        if (w != wend)
            err = "coded stream has trailing words (corrupt)";
    }
unlock:
    Py_END_ALLOW_THREADS
done:
    free(table);
    free(cum);
    Py_INCREF(Py_None);
    return finish(err, Py_None, 6, &words, &freqs, &params, &rows, &center, &out);
}

static PyObject *rans_encode(PyObject *self, PyObject *args)
{
    Py_buffer matrix, freqs, params, rows, center;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*n", &matrix, &freqs, &params, &rows, &center, &n))
        return NULL;
    const char *err = NULL;
    uint32_t *cum = NULL;
    unsigned char *buf = NULL;
    PyObject *result = NULL;
    Py_ssize_t nc, g, cap = 0, start = 0, coded_rows = 0;
    err = check_block(&params, &rows, &center, &freqs, &matrix, n, &nc, &g);
    if (err)
        goto done;
    for (Py_ssize_t c = 0; c < nc; c++) /* checked: the clusters' rows tile rows[] */
        coded_rows += ((const int64_t *)params.buf)[c * P_COLS + P_NROWS];
    /* at most one word per coding step, two steps per element, plus the states: sized by
     * the elements the clusters code (overflow-checked), not by what rows[] could hold */
    if (coded_rows > (PY_SSIZE_T_MAX / 4 - 2 * LANES) / 2 / n) {
        err = "symbol matrix too large to encode";
        goto done;
    }
    cap = 2 * coded_rows * n + 2 * LANES;
    cum = (uint32_t *)malloc((MAX_SPAN_H + 1) * sizeof(uint32_t));
    buf = (unsigned char *)malloc((size_t)cap * 2);
    if (!cum || !buf) {
        err = "out of memory";
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const int64_t *par = (const int64_t *)params.buf;
    const int32_t *rws = (const int32_t *)rows.buf;
    const int32_t *ctr = (const int32_t *)center.buf;
    const int32_t *src = (const int32_t *)matrix.buf;
    const uint16_t *fq = (const uint16_t *)freqs.buf;
    unsigned char *w = buf + 2 * cap; /* little-endian words, written backwards */
    uint32_t x[LANES];
    for (int k = 0; k < LANES; k++)
        x[k] = RANS_L;
    Py_ssize_t total = coded_rows * n;
    unsigned lane = (unsigned)((total - 1) & (LANES - 1)); /* lane of the last element */
    for (Py_ssize_t c = nc - 1; c >= 0 && !err; c--) {
        const int64_t *p = par + c * P_COLS;
        int64_t span_h = p[P_SPAN_H];
        unsigned raw = (unsigned)p[P_RAW];
        if (cum_table(fq + p[P_FOFF], span_h, cum)) {
            err = "cluster table does not sum to its total";
            break;
        }
        const int64_t limit = span_h << raw;
        for (int64_t r = p[P_NROWS] - 1; r >= 0 && !err; r--) {
            int32_t row = rws[p[P_ROW0] + r];
            if (row < 0 || row >= g) {
                err = "cluster rows out of range";
                break;
            }
            const int64_t base = p[P_LO] + ctr[row];
            const int32_t *in = src + (Py_ssize_t)row * n;
            for (Py_ssize_t t = n - 1; t >= 0; t--) {
                int64_t v = (int64_t)in[t] - base;
                if (v < 0 || v >= limit) {
                    err = "a symbol lies outside its cluster's window";
                    break;
                }
                uint32_t xs = x[lane];
                if (raw) { /* low bits, uniform: decoded after h, so encoded first */
                    uint32_t low = (uint32_t)v & ((1u << raw) - 1);
                    uint32_t f = 1u << (PREC - raw);
                    if (xs >= (f << (32 - PREC))) {
                        w = wr16(w, xs);
                        xs >>= 16;
                    }
                    xs = ((xs >> (PREC - raw)) << PREC) + (xs & (f - 1)) + (low << (PREC - raw));
                }
                uint32_t h = (uint32_t)(v >> raw);
                uint32_t f = cum[h + 1] - cum[h];
                if (xs >= (f << (32 - PREC))) {
                    w = wr16(w, xs);
                    xs >>= 16;
                }
                xs = ((xs / f) << PREC) + (xs % f) + cum[h];
                x[lane] = xs;
                lane = (lane - 1) & (LANES - 1);
            }
        }
    }
    if (!err) {
        for (int k = LANES - 1; k >= 0; k--) {
            w = wr16(w, x[k] >> 16);
            w = wr16(w, x[k]);
        }
        start = w - buf;
    }
    Py_END_ALLOW_THREADS
    if (!err)
        result = PyBytes_FromStringAndSize((const char *)(buf + start), 2 * cap - start);
done:
    free(cum);
    free(buf);
    return finish(err, result, 5, &matrix, &freqs, &params, &rows, &center);
}

/* Encoder helpers: per-row histograms and the choice of each row's parametric model.
 * Neither affects what a decoder must do, only how well the encoder chooses. */

static PyObject *row_histograms(PyObject *self, PyObject *args)
{
    /* counts[offs[r] + v - lo[r]] += 1 for every value v of matrix row rows[r] */
    Py_buffer matrix, rows, lo, offs, counts;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*n", &matrix, &rows, &lo, &offs, &counts, &n))
        return NULL;
    const char *err = NULL;
    Py_ssize_t nr = rows.len / (Py_ssize_t)sizeof(int32_t);
    Py_ssize_t g = n > 0 ? matrix.len / (Py_ssize_t)sizeof(int32_t) / n : 0;
    Py_ssize_t ncells = counts.len / (Py_ssize_t)sizeof(double);
    if (n < 1 || lo.len != nr * (Py_ssize_t)sizeof(int64_t) || offs.len != (nr + 1) * (Py_ssize_t)sizeof(int64_t)) {
        err = "histogram arguments have inconsistent sizes";
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const int32_t *m = (const int32_t *)matrix.buf;
    const int32_t *rw = (const int32_t *)rows.buf;
    const int64_t *l = (const int64_t *)lo.buf, *o = (const int64_t *)offs.buf;
    double *c = (double *)counts.buf;
    memset(c, 0, (size_t)ncells * sizeof(double));
    for (Py_ssize_t r = 0; r < nr && !err; r++) {
        if (rw[r] < 0 || rw[r] >= g || o[r] < 0 || o[r + 1] > ncells || o[r] > o[r + 1]
            || l[r] < -(1LL << 32) || l[r] > (1LL << 32)) { /* no overflow in row[t] - l[r] */
            err = "histogram row out of range";
            break;
        }
        const int32_t *row = m + (Py_ssize_t)rw[r] * n;
        double *h = c + o[r];
        int64_t width = o[r + 1] - o[r];
        for (Py_ssize_t t = 0; t < n; t++) {
            int64_t v = (int64_t)row[t] - l[r];
            if (v < 0 || v >= width) {
                err = "a value lies outside its row's range";
                break;
            }
            h[v] += 1.0;
        }
    }
    Py_END_ALLOW_THREADS
done:
    Py_INCREF(Py_None);
    return finish(err, Py_None, 5, &matrix, &rows, &lo, &offs, &counts);
}

#define N_BETAS 4
#define U_RES 16
#define U_LEN (64 * U_RES)
#define S_OFFSET 32
#define POW_LEN 4096
#define MAX_FIT_WIDTH (1LL << 20) /* values one row's counts may cover (the encoder: 1 << 16) */
#define MAX_FIT_LO (1LL << 32)    /* |lo| of a row (the encoder's values are int32) */

static PyObject *fit_param(PyObject *self, PyObject *args)
{
    /* For each row (cells offs[r]..offs[r+1] holding counts of the values lo[r]+j):
     * mu4 = round(4 * mean), then for each shape and five scales around its moment
     * estimate, the code length of the row under the decoder's weights; keep the best.
     * powers: [N_BETAS, POW_LEN] (d / 4) ** beta; gg / lgg: [N_BETAS, U_LEN] weights and
     * their log2; s_fixed: s * 2**20 per sidx. */
    Py_buffer counts, lo, offs, betas, powers, gg, lgg, s_fixed, mu4, sidx, shape;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*w*w*w*n", &counts, &lo, &offs, &betas, &powers, &gg, &lgg,
                          &s_fixed, &mu4, &sidx, &shape, &n))
        return NULL;
    const char *err = NULL;
    Py_ssize_t nr = lo.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t ncells = counts.len / (Py_ssize_t)sizeof(double);
    if (n < 1 || offs.len != (nr + 1) * (Py_ssize_t)sizeof(int64_t) || betas.len != N_BETAS * (Py_ssize_t)sizeof(double)
        || powers.len != N_BETAS * POW_LEN * (Py_ssize_t)sizeof(double) || gg.len != N_BETAS * U_LEN * (Py_ssize_t)sizeof(double) || lgg.len != gg.len
        || s_fixed.len != 256 * (Py_ssize_t)sizeof(double) || mu4.len != lo.len || sidx.len != lo.len
        || shape.len != lo.len) {
        err = "fit arguments have inconsistent sizes";
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const double *c = (const double *)counts.buf, *bt = (const double *)betas.buf, *pw = (const double *)powers.buf;
    const double *w = (const double *)gg.buf, *lw = (const double *)lgg.buf, *sf = (const double *)s_fixed.buf;
    const int64_t *l = (const int64_t *)lo.buf, *o = (const int64_t *)offs.buf;
    int64_t *out_mu = (int64_t *)mu4.buf, *out_s = (int64_t *)sidx.buf, *out_b = (int64_t *)shape.buf;
    const double dn = (double)n;
    /* Scales and shapes become divisors and exponents, counts weigh values, and rows'
     * windows and means become table indices below: checked first, so no argument can
     * make an index negative or an integer overflow (the encoder passes its own tables). */
    for (int i = 0; i < 256 && !err; i++)
        if (!(sf[i] > 0.0) || isinf(sf[i]))
            err = "fit scales must be finite and positive";
    for (int i = 0; i < N_BETAS && !err; i++)
        if (!(bt[i] > 0.0) || isinf(bt[i]))
            err = "fit shapes must be finite and positive";
    for (Py_ssize_t r = 0; r < nr && !err; r++) {
        int64_t a = o[r], b = o[r + 1];
        if (a < 0 || b > ncells || a >= b || b - a > MAX_FIT_WIDTH || l[r] < -MAX_FIT_LO || l[r] > MAX_FIT_LO) {
            err = "fit row out of range";
            break;
        }
        double sum = 0.0;
        for (int64_t j = a; j < b; j++) {
            if (!(c[j] >= 0.0) || isinf(c[j])) {
                err = "fit counts must be finite and non-negative";
                break;
            }
            sum += c[j] * (double)(l[r] + (j - a));
        }
        double mean4 = nearbyint(4.0 * sum / dn);
        if (err || !(fabs(mean4) <= 4.0 * (MAX_FIT_LO + MAX_FIT_WIDTH))) {
            err = err ? err : "fit counts out of range";
            break;
        }
        int64_t m4 = (int64_t)mean4;
        double best = INFINITY;
        int64_t best_s = 0, best_b = 0;
        for (int si = 0; si < N_BETAS; si++) {
            double beta = bt[si], mom = 0.0;
            const double *pt = pw + si * POW_LEN;
            for (int64_t j = a; j < b; j++)
                if (c[j] > 0) {
                    int64_t d = 4 * (l[r] + (j - a)) - m4;
                    d = d < 0 ? -d : d;
                    mom += c[j] * (d < POW_LEN ? pt[d] : pow((double)d / 4.0, beta));
                }
            double s0 = pow(beta * mom / dn, 1.0 / beta);
            if (!(s0 >= 1.0 / 16))
                s0 = 1.0 / 16;
            double lc = nearbyint(8.0 * log2(s0)); /* >= -32: s0 >= 1/16 */
            int64_t c0 = (lc < 512.0 ? (int64_t)lc : 512) + S_OFFSET;
            const double *gw = w + si * U_LEN, *glw = lw + si * U_LEN;
            for (int dc = -2; dc <= 2; dc++) {
                int64_t cand = c0 + dc;
                cand = cand < 0 ? 0 : (cand > 255 ? 255 : cand);
                double s = sf[cand], norm = 0.0, lik = 0.0;
                for (int64_t j = a; j < b; j++) {
                    int64_t d = 4 * (l[r] + (j - a)) - m4;
                    double q = (double)((d < 0 ? -d : d) << 22) / s;
                    int64_t u = q >= U_LEN - 1 ? U_LEN - 1 : (int64_t)q;
                    norm += gw[u];
                    if (c[j] > 0)
                        lik += c[j] * glw[u];
                }
                double cost = dn * log2(norm) - lik;
                if (cost < best) {
                    best = cost;
                    best_s = cand;
                    best_b = si;
                }
            }
        }
        out_mu[r] = m4;
        out_s[r] = best_s;
        out_b[r] = best_b;
    }
    Py_END_ALLOW_THREADS
done:
    Py_INCREF(Py_None);
    return finish(err, Py_None, 11, &counts, &lo, &offs, &betas, &powers, &gg, &lgg, &s_fixed, &mu4, &sidx,
                  &shape);
}

static PyMethodDef methods[] = {
    {"row_histograms", row_histograms, METH_VARARGS,
     "row_histograms(matrix, rows, lo, offs, counts, n): per-row value counts (encoder)."},
    {"fit_param", fit_param, METH_VARARGS,
     "fit_param(counts, lo, offs, betas, powers, gg, lgg, s_fixed, mu4, sidx, shape, n): rows' models (encoder)."},
    {"decode", rans_decode, METH_VARARGS,
     "decode(words, freqs, params, rows, center, out, n): decode a rans stream into out (int32 [g, n])."},
    {"encode", rans_encode, METH_VARARGS,
     "encode(matrix, freqs, params, rows, center, n) -> bytes: the rans stream of matrix (int32 [g, n])."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvzip.codecs._rans", "kvzip's interleaved rANS coder (C).", -1, methods,
};

PyMODINIT_FUNC PyInit__rans(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m) {
        PyModule_AddIntConstant(m, "PREC", PREC);
        PyModule_AddIntConstant(m, "LANES", LANES);
        PyModule_AddIntConstant(m, "MAX_SPAN_H", MAX_SPAN_H);
        PyModule_AddIntConstant(m, "MAX_RAW", MAX_RAW);
    }
    return m;
}
