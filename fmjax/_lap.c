/* Dense linear assignment (Jonker-Volgenant shortest augmenting paths) for fmjax's exact coupling.
 *
 * solve(cost, n) takes a C-contiguous float32 buffer of n*n costs and returns bytes holding n int32
 * column indices: row i is assigned to column out[i], a permutation minimising the total cost.
 *
 * An epsilon-scaling auction (float32, SIMD row scans) finds near-optimal column duals fast; the
 * Jonker-Volgenant shortest augmenting path phase (float64 arithmetic) then makes the assignment
 * exactly optimal for the given costs. The auction stops at eps = final_ratio * (max(cost) - min(cost))
 * / (n + 1), or 16 float32 ulps of max |cost| if larger, dividing eps by theta per phase.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define LANES 8

/* Merge per-lane (min, second min, argmin) into the row's, then scan the tail from j on. */
static inline int merge_lanes(const float *m1, const float *m2, const int *i1, int lanes, const float *c,
                              const float *v, int j, int n, float *m1out, float *m2out) {
    float best = FLT_MAX, second = FLT_MAX;
    int j1 = 0;
    for (int k = 0; k < lanes; k++) {
        if (m1[k] < best || (m1[k] == best && i1[k] < j1)) {
            second = best < second ? best : second;
            if (m1[k] < best) { best = m1[k]; } else { second = m1[k]; }
            j1 = i1[k];
        } else if (m1[k] < second) second = m1[k];
        if (m2[k] < second) second = m2[k];
    }
    for (; j < n; j++) {
        float h = c[j] - v[j];
        if (h < best) { second = best; best = h; j1 = j; }
        else if (h < second) second = h;
    }
    *m1out = best;
    *m2out = second;
    return j1;
}


/* Smallest and second smallest of h[j] = c[j] - v[j] over a row, and the first index of the smallest.
 * Per-lane running (min, second min) pairs keep the scan free of branches (SSE2 where available). */
static int best_two_base(const float *c, const float *v, int n, float *m1out, float *m2out) {
    float m1[LANES], m2[LANES];
    int i1[LANES];
    int j = 0;
#if defined(__SSE2__)
    __m128 a1 = _mm_set1_ps(FLT_MAX), a2 = a1, b1 = a1, b2 = a1;
    __m128i ia = _mm_setzero_si128(), ib = ia, ja = _mm_setr_epi32(0, 1, 2, 3), jb = _mm_setr_epi32(4, 5, 6, 7);
    const __m128i step = _mm_set1_epi32(LANES);
    for (; j + LANES <= n; j += LANES) {
        __m128 h = _mm_sub_ps(_mm_loadu_ps(c + j), _mm_loadu_ps(v + j));
        __m128 g = _mm_sub_ps(_mm_loadu_ps(c + j + 4), _mm_loadu_ps(v + j + 4));
        __m128i lt_h = _mm_castps_si128(_mm_cmplt_ps(h, a1)), lt_g = _mm_castps_si128(_mm_cmplt_ps(g, b1));
        ia = _mm_or_si128(_mm_and_si128(lt_h, ja), _mm_andnot_si128(lt_h, ia));
        ib = _mm_or_si128(_mm_and_si128(lt_g, jb), _mm_andnot_si128(lt_g, ib));
        a2 = _mm_min_ps(a2, _mm_max_ps(h, a1)); /* the larger of the pair is a second-min candidate */
        a1 = _mm_min_ps(a1, h);
        b2 = _mm_min_ps(b2, _mm_max_ps(g, b1));
        b1 = _mm_min_ps(b1, g);
        ja = _mm_add_epi32(ja, step);
        jb = _mm_add_epi32(jb, step);
    }
    _mm_storeu_ps(m1, a1);
    _mm_storeu_ps(m1 + 4, b1);
    _mm_storeu_ps(m2, a2);
    _mm_storeu_ps(m2 + 4, b2);
    _mm_storeu_si128((__m128i *)i1, ia);
    _mm_storeu_si128((__m128i *)(i1 + 4), ib);
#else
    for (int k = 0; k < LANES; k++) { m1[k] = m2[k] = FLT_MAX; i1[k] = 0; }
    for (; j + LANES <= n; j += LANES) {
        for (int k = 0; k < LANES; k++) {
            float h = c[j + k] - v[j + k];
            float hi = h > m1[k] ? h : m1[k];
            m2[k] = hi < m2[k] ? hi : m2[k];
            if (h < m1[k]) { m1[k] = h; i1[k] = j + k; }
        }
    }
#endif
    return merge_lanes(m1, m2, i1, LANES, c, v, j, n, m1out, m2out);
}


#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_PATH 1
/* The same scan, 16 floats per step with AVX2; chosen at import when the CPU has it. */
__attribute__((target("avx2"))) static int best_two_avx2(const float *c, const float *v, int n, float *m1out,
                                                          float *m2out) {
    float m1[16], m2[16];
    int i1[16];
    int j = 0;
    __m256 a1 = _mm256_set1_ps(FLT_MAX), a2 = a1, b1 = a1, b2 = a1;
    __m256i ia = _mm256_setzero_si256(), ib = ia;
    __m256i ja = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), jb = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i step = _mm256_set1_epi32(16);
    for (; j + 16 <= n; j += 16) {
        __m256 h = _mm256_sub_ps(_mm256_loadu_ps(c + j), _mm256_loadu_ps(v + j));
        __m256 g = _mm256_sub_ps(_mm256_loadu_ps(c + j + 8), _mm256_loadu_ps(v + j + 8));
        __m256 lt_h = _mm256_cmp_ps(h, a1, _CMP_LT_OQ), lt_g = _mm256_cmp_ps(g, b1, _CMP_LT_OQ);
        ia = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(ia), _mm256_castsi256_ps(ja), lt_h));
        ib = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(ib), _mm256_castsi256_ps(jb), lt_g));
        a2 = _mm256_min_ps(a2, _mm256_max_ps(h, a1));
        a1 = _mm256_min_ps(a1, h);
        b2 = _mm256_min_ps(b2, _mm256_max_ps(g, b1));
        b1 = _mm256_min_ps(b1, g);
        ja = _mm256_add_epi32(ja, step);
        jb = _mm256_add_epi32(jb, step);
    }
    _mm256_storeu_ps(m1, a1);
    _mm256_storeu_ps(m1 + 8, b1);
    _mm256_storeu_ps(m2, a2);
    _mm256_storeu_ps(m2 + 8, b2);
    _mm256_storeu_si256((__m256i *)i1, ia);
    _mm256_storeu_si256((__m256i *)(i1 + 8), ib);
    return merge_lanes(m1, m2, i1, 16, c, v, j, n, m1out, m2out);
}
#endif

static int (*best_two)(const float *, const float *, int, float *, float *) = best_two_base;

/* Forward auction with epsilon scaling (Bertsekas), Gauss-Seidel: one free row bids at a time,
 * lowering the dual v of its best column by the gap to its second best plus eps. Ends with every
 * row assigned and v eps-optimal for the float32 costs. */
static void auction(int n, const float *c, int *rowsol, int *colsol, float *v, int *queue,
                    float eps0, float eps_final, float theta) {
    for (int j = 0; j < n; j++) v[j] = 0.0f;
    for (float eps = eps0;; eps = eps / theta > eps_final ? eps / theta : eps_final) {
        for (int i = 0; i < n; i++) { rowsol[i] = -1; queue[i] = i; }
        for (int j = 0; j < n; j++) colsol[j] = -1;
        int head = 0, count = n;
        while (count > 0) {
            int i = queue[head];
            head = head + 1 == n ? 0 : head + 1;
            count--;
            float umin, usubmin;
            int j1 = best_two(c + (size_t)i * n, v, n, &umin, &usubmin);
            v[j1] -= (n > 1 ? usubmin - umin : 0.0f) + eps;
            int i0 = colsol[j1];
            rowsol[i] = j1;
            colsol[j1] = i;
            if (i0 >= 0) {
                rowsol[i0] = -1;
                queue[(head + count) % n] = i0;
                count++;
            }
        }
        if (eps <= eps_final) break;
    }
}

/* Exact assignment: auction for good duals, then Jonker-Volgenant shortest augmenting paths (in
 * double precision) from every row whose auction column is not an exact minimum of its reduced cost.
 * Returns 1, 0 when out of memory, -1 for a non-finite cost.
 * Assigned rows keep the invariant "assigned column = row minimum of c - v", so the augmentation
 * ends with an optimal assignment whatever the auction left behind. */
static int lap(int n, const float *c, int *rowsol, double final_ratio, double theta) {
    int *colsol = malloc(sizeof(int) * n), *freerows = malloc(sizeof(int) * n);
    int *collist = malloc(sizeof(int) * n), *pred = malloc(sizeof(int) * n);
    double *v = malloc(sizeof(double) * n), *d = malloc(sizeof(double) * n);
    float *vf = malloc(sizeof(float) * n);
    int ok = colsol && freerows && collist && pred && v && d && vf;
    if (!ok) goto done;

    float cmax = -FLT_MAX, cmin = FLT_MAX;
    for (size_t k = 0; k < (size_t)n * n; k++) {
        if (!(c[k] <= FLT_MAX && c[k] >= -FLT_MAX)) { ok = -1; goto done; } /* NaN or inf */
        if (c[k] > cmax) cmax = c[k];
        if (c[k] < cmin) cmin = c[k];
    }
    /* eps scales with the costs' range; it never falls below a few float32 ulps of their magnitude,
     * where a bid would leave the price unchanged and tied rows would outbid each other forever */
    double range = (double)cmax - (double)cmin, magnitude = fabs(cmax) > fabs(cmin) ? fabs(cmax) : fabs(cmin);
    double eps_relative = range * final_ratio / (n + 1), eps_ulps = 16.0 * FLT_EPSILON * magnitude;
    float eps_final = (float)(eps_relative > eps_ulps ? eps_relative : eps_ulps) + FLT_MIN;
    auction(n, c, rowsol, colsol, vf, freerows, (float)(range / 4) + eps_final, eps_final, (float)theta);
    for (int j = 0; j < n; j++) v[j] = vf[j];

    int numfree = 0;
    for (int i = 0; i < n; i++) {
        const float *ci = c + (size_t)i * n;
        double umin = DBL_MAX;
        for (int j = 0; j < n; j++) if ((double)ci[j] - v[j] < umin) umin = (double)ci[j] - v[j];
        int j = rowsol[i];
        if ((double)ci[j] - v[j] > umin) { colsol[j] = -1; rowsol[i] = -1; freerows[numfree++] = i; }
    }

    for (int f = 0; f < numfree; f++) {
        int freerow = freerows[f], endofpath = -1, low = 0, up = 0, last = 0;
        double min = 0;
        const float *cf = c + (size_t)freerow * n;
        for (int j = 0; j < n; j++) { d[j] = (double)cf[j] - v[j]; pred[j] = freerow; collist[j] = j; }
        for (;;) {
            if (up == low) {
                /* the columns at the new minimum distance become the ones to scan */
                last = low - 1;
                min = d[collist[up++]];
                for (int k = up; k < n; k++) {
                    int j = collist[k];
                    double h = d[j];
                    if (h <= min) {
                        if (h < min) { up = low; min = h; }
                        collist[k] = collist[up];
                        collist[up++] = j;
                    }
                }
                for (int k = low; k < up; k++)
                    if (colsol[collist[k]] < 0) { endofpath = collist[k]; break; }
                if (endofpath >= 0) break;
            }
            /* scan one column at the minimum: relax the distances through its row */
            int j1 = collist[low++];
            int i = colsol[j1];
            const float *ci = c + (size_t)i * n;
            double h = (double)ci[j1] - v[j1] - min;
            for (int k = up; k < n; k++) {
                int j = collist[k];
                double v2 = (double)ci[j] - v[j] - h;
                if (v2 < d[j]) {
                    pred[j] = i;
                    if (v2 == min) {
                        if (colsol[j] < 0) { endofpath = j; break; }
                        collist[k] = collist[up];
                        collist[up++] = j;
                    }
                    d[j] = v2;
                }
            }
            if (endofpath >= 0) break;
        }
        for (int k = 0; k <= last; k++) { int j1 = collist[k]; v[j1] += d[j1] - min; }
        for (;;) {
            int i = pred[endofpath];
            colsol[endofpath] = i;
            int j1 = endofpath;
            endofpath = rowsol[i];
            rowsol[i] = j1;
            if (i == freerow) break;
        }
    }
done:
    free(colsol); free(freerows); free(collist); free(pred); free(v); free(d); free(vf);
    return ok;
}

static PyObject *solve(PyObject *self, PyObject *args) {
    Py_buffer buf;
    int n;
    double final_ratio = 1e-3, theta = 4.0;
    if (!PyArg_ParseTuple(args, "y*i|dd", &buf, &n, &final_ratio, &theta)) return NULL;
    if (n < 0 || buf.len != (Py_ssize_t)n * n * (Py_ssize_t)sizeof(float)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "cost must hold n*n float32 values");
        return NULL;
    }
    if (!(theta > 1.0) || !(final_ratio > 0.0)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "theta must be > 1 and final_ratio > 0");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n * sizeof(int));
    if (!out) { PyBuffer_Release(&buf); return NULL; }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = n == 0 ? 1 : lap(n, (const float *)buf.buf, (int *)PyBytes_AS_STRING(out), final_ratio, theta);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (ok == -1) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_ValueError, "cost must be finite (found NaN or inf in the coupling's cost matrix)");
        return NULL;
    }
    if (!ok) { Py_DECREF(out); return PyErr_NoMemory(); }
    return out;
}

/* solve_points(x, y, n, d): the same on the squared Euclidean costs between two float32 point clouds
 * of shape [n, d], computed here in double precision and rounded to float32 once. */
static PyObject *solve_points(PyObject *self, PyObject *args) {
    Py_buffer bx, by;
    int n, d;
    double final_ratio = 1e-3, theta = 4.0;
    if (!PyArg_ParseTuple(args, "y*y*ii|dd", &bx, &by, &n, &d, &final_ratio, &theta)) return NULL;
    Py_ssize_t expected = (Py_ssize_t)n * d * (Py_ssize_t)sizeof(float);
    if (n < 0 || d < 1 || bx.len != expected || by.len != expected || !(theta > 1.0) || !(final_ratio > 0.0)) {
        PyBuffer_Release(&bx);
        PyBuffer_Release(&by);
        PyErr_SetString(PyExc_ValueError, "x and y must hold n*d float32 values; theta > 1, final_ratio > 0");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n * sizeof(int));
    float *cost = malloc(sizeof(float) * ((size_t)n * n + 1));
    if (!out || !cost) {
        Py_XDECREF(out);
        free(cost);
        PyBuffer_Release(&bx);
        PyBuffer_Release(&by);
        return PyErr_NoMemory();
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    const float *x = bx.buf, *y = by.buf;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double acc = 0.0;
            for (int k = 0; k < d; k++) {
                double diff = (double)x[(size_t)i * d + k] - (double)y[(size_t)j * d + k];
                acc += diff * diff;
            }
            cost[(size_t)i * n + j] = (float)acc;
        }
    ok = n == 0 ? 1 : lap(n, cost, (int *)PyBytes_AS_STRING(out), final_ratio, theta);
    Py_END_ALLOW_THREADS
    free(cost);
    PyBuffer_Release(&bx);
    PyBuffer_Release(&by);
    if (ok == -1) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_ValueError, "x0 and x1 must be finite (found NaN or inf)");
        return NULL;
    }
    if (!ok) { Py_DECREF(out); return PyErr_NoMemory(); }
    return out;
}

static PyMethodDef methods[] = {
    {"solve", solve, METH_VARARGS,
     "solve(cost: float32 buffer of n*n, n, final_ratio=1e-3, theta=4) -> bytes of n int32 columns"},
    {"solve_points", solve_points, METH_VARARGS,
     "solve_points(x, y: float32 buffers of n*d, n, d, final_ratio=1e-3, theta=4) -> bytes of n int32 columns"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lap", "Dense linear assignment.", -1, methods};

PyMODINIT_FUNC PyInit__lap(void) {
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) best_two = best_two_avx2;
#endif
    return PyModule_Create(&module);
}
