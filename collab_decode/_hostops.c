/* The per-step work around the models that is too small for torch ops, in C: the greedy sampler's reductions, the
   entropy routers' entropy, and the neural router's top logits and MLP, over a few rows of float32 memory (CPU
   tensors' data_ptr).

   greedy(address, rows, cols, row_stride, top1) -> (token ids, row maxima, top-1 probabilities or None)
   entropy(address, rows, cols, row_stride)      -> each row's softmax entropy (the entropy routers')
   top(address, rows, cols, row_stride, k)       -> (ids, values): each row's k largest logits, descending
   mlp(rows, norm, layers)                       -> one output per row of a LayerNorm-then-Linear/GELU stack
                                                    (rows: lists of numbers; the stack's weights: addresses)

   Row r of a (rows, cols) matrix is cols floats from address + 4 * r * row_stride (its columns contiguous).

   Why: at batch 1 on a CPU each torch op costs ~5-10 us right after a model's forward (its code and data are out
   of the caches) whatever its arithmetic, and a step's sampler and router are a dozen such ops on a few hundred
   numbers. collab_decode/sampling.py and collab_decode/routing (policies.py, neural.py) call these for a few rows on
   the CPU and keep the torch ops for larger batches, other devices, and installs without this module (no C
   compiler). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#define MAX_TOP 256 /* most logits `top` keeps a row (the module's MAX_TOP) */

/* ---- greedy ------------------------------------------------------------------------------------------------- */

/* The first largest value of x[0:n] and its index, as torch.max takes them; the first NaN and its index if any. */
static float row_max(const float *x, Py_ssize_t n, Py_ssize_t *index) {
    float best = x[0];
    Py_ssize_t at = 0;
    if (isnan(best)) {
        *index = 0;
        return best;
    }
    for (Py_ssize_t j = 1; j < n; j++) {
        float v = x[j];
        if (isnan(v)) {
            *index = j;
            return v;
        }
        if (v > best) {
            best = v;
            at = j;
        }
    }
    *index = at;
    return best;
}

/* 1 / sum(exp(x - best)): the softmax's largest probability (NaN unless best and every x are finite). */
static double top1_probability(const float *x, Py_ssize_t n, float best) {
    double sum = 0.0;
    for (Py_ssize_t j = 0; j < n; j++)
        sum += expf(x[j] - best);
    return 1.0 / sum;
}

/* Puts a and b at index i of the lists la and lb (which take both references); -1, both released, if either is
   NULL (its allocation failed). */
static int set_pair(PyObject *la, PyObject *lb, Py_ssize_t i, PyObject *a, PyObject *b) {
    if (a == NULL || b == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return -1;
    }
    PyList_SET_ITEM(la, i, a);
    PyList_SET_ITEM(lb, i, b);
    return 0;
}

/* Checks that a call of `usage` got its `expected` arguments and reads (address, rows, cols, row_stride) from
   args[0:4]; 0 on success, -1 with an exception set. */
static int parse_matrix(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, const char *usage,
                        const float **base, Py_ssize_t *rows, Py_ssize_t *cols, Py_ssize_t *stride) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", usage, expected);
        return -1;
    }
    *base = (const float *)PyLong_AsVoidPtr(args[0]);
    *rows = PyLong_AsSsize_t(args[1]);
    *cols = PyLong_AsSsize_t(args[2]);
    *stride = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return -1;
    if (*base == NULL || *rows < 0 || *cols < 1 || (*rows > 1 && *stride < *cols)) {
        PyErr_SetString(PyExc_ValueError, "a null address, or a shape that is not rows of cols floats");
        return -1;
    }
    return 0;
}

/* greedy(address, rows, cols, row_stride, top1): per row the first largest logit's column (the greedy token), that
   logit (NaN if the row holds one, +inf if it holds +inf, -inf if nothing in it is finite: the engine's finite
   check) and, with top1, 1 / sum(exp(x - max)), the softmax's largest probability (NaN where the row is not
   finite, as the softmax's). Three lists. */
static PyObject *greedy(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    const float *base;
    Py_ssize_t rows, cols, stride;
    if (parse_matrix(args, nargs, 5, "greedy(address, rows, cols, row_stride, top1)", &base, &rows, &cols,
                     &stride) < 0)
        return NULL;
    int top1 = PyObject_IsTrue(args[4]);
    if (top1 < 0)
        return NULL;
    PyObject *ids = PyList_New(rows), *maxima = PyList_New(rows);
    PyObject *probs = top1 ? PyList_New(rows) : Py_NewRef(Py_None);
    if (ids == NULL || maxima == NULL || probs == NULL)
        goto fail;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *x = base + r * stride;
        Py_ssize_t index;
        float best = row_max(x, cols, &index);
        if (set_pair(ids, maxima, r, PyLong_FromSsize_t(index), PyFloat_FromDouble(best)) < 0)
            goto fail;
        if (top1) {
            PyObject *p = PyFloat_FromDouble(top1_probability(x, cols, best));
            if (p == NULL)
                goto fail;
            PyList_SET_ITEM(probs, r, p);
        }
    }
    return Py_BuildValue("(NNN)", ids, maxima, probs); /* (N: the tuple takes the three references) */
fail:
    Py_XDECREF(ids);
    Py_XDECREF(maxima);
    Py_XDECREF(probs);
    return NULL;
}

/* ---- entropy ------------------------------------------------------------------------------------------------ */

/* entropy(address, rows, cols, row_stride): each row's softmax entropy in nats, log(S) - sum(e (x - max)) / S with
   e = exp(x - max) and S = sum(e), terms of probability 0 (a -inf logit) counted as 0; NaN for a row holding NaN or
   +inf, or nothing finite. A list. */
static PyObject *entropy(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    const float *base;
    Py_ssize_t rows, cols, stride;
    if (parse_matrix(args, nargs, 4, "entropy(address, rows, cols, row_stride)", &base, &rows, &cols, &stride) < 0)
        return NULL;
    PyObject *out = PyList_New(rows);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *x = base + r * stride;
        Py_ssize_t index;
        float best = row_max(x, cols, &index);
        double h = NAN;
        if (isfinite(best)) {
            double sum = 0.0, weighted = 0.0;
            for (Py_ssize_t j = 0; j < cols; j++) {
                float d = x[j] - best, e = expf(d);
                sum += e;
                if (e > 0.0f)
                    weighted += (double)e * d;
            }
            h = log(sum) - weighted / sum;
        }
        PyObject *value = PyFloat_FromDouble(h);
        if (value == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, r, value);
    }
    return out;
}

/* ---- top ---------------------------------------------------------------------------------------------------- */

/* top(address, rows, cols, row_stride, k): each row's k largest values, descending (the lower column first among
   equal values), and their columns: two lists of rows. For finite rows (a NaN is never taken). */
static PyObject *top(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    const float *base;
    Py_ssize_t rows, cols, stride;
    if (parse_matrix(args, nargs, 5, "top(address, rows, cols, row_stride, k)", &base, &rows, &cols, &stride) < 0)
        return NULL;
    Py_ssize_t k = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (k < 1 || k > cols || k > MAX_TOP) {
        PyErr_Format(PyExc_ValueError, "top: k must be in [1, min(cols, %d)], got %zd", MAX_TOP, k);
        return NULL;
    }
    PyObject *all_ids = PyList_New(rows), *all_values = PyList_New(rows);
    if (all_ids == NULL || all_values == NULL)
        goto fail;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *x = base + r * stride;
        float values[MAX_TOP];
        Py_ssize_t ids[MAX_TOP], kept = 0;
        for (Py_ssize_t j = 0; j < cols; j++) {
            float v = x[j];
            if (kept == k && !(v > values[k - 1]))
                continue; /* (not larger than the smallest kept, or NaN) */
            if (kept < k) {
                if (isnan(v))
                    continue;
                kept++;
            }
            Py_ssize_t at = kept - 1; /* insertion: shift the smaller ones down */
            while (at > 0 && v > values[at - 1]) {
                values[at] = values[at - 1];
                ids[at] = ids[at - 1];
                at--;
            }
            values[at] = v;
            ids[at] = j;
        }
        PyObject *row_ids = PyList_New(kept), *row_values = PyList_New(kept);
        if (set_pair(all_ids, all_values, r, row_ids, row_values) < 0)
            goto fail;
        for (Py_ssize_t i = 0; i < kept; i++)
            if (set_pair(row_ids, row_values, i, PyLong_FromSsize_t(ids[i]), PyFloat_FromDouble(values[i])) < 0)
                goto fail;
    }
    return Py_BuildValue("(NN)", all_ids, all_values);
fail:
    Py_XDECREF(all_ids);
    Py_XDECREF(all_values);
    return NULL;
}

/* ---- mlp ---------------------------------------------------------------------------------------------------- */

typedef struct {
    const float *weight_t; /* (in, out): the Linear's weight transposed */
    const float *bias;     /* (out,) */
    Py_ssize_t in, out;
} Linear;

/* Reads a row of dim features (a list of numbers) into x; 0 on success, -1 with an exception set. */
static int read_row(PyObject *row, float *x, Py_ssize_t dim) {
    if (!PyList_Check(row)) {
        PyErr_SetString(PyExc_TypeError, "mlp: a row is a list of numbers");
        return -1;
    }
    if (PyList_GET_SIZE(row) != dim) {
        PyErr_Format(PyExc_ValueError, "mlp: a row has %zd features, the input %zd", PyList_GET_SIZE(row), dim);
        return -1;
    }
    for (Py_ssize_t i = 0; i < dim; i++) {
        double v = PyFloat_AsDouble(PyList_GET_ITEM(row, i));
        if (v == -1.0 && PyErr_Occurred())
            return -1;
        x[i] = (float)v;
    }
    return 0;
}

/* y = x @ weight_t + bias, the weight's rows read in order (the inner loop over contiguous outputs vectorises). */
static void linear(const Linear *layer, const float *x, float *y) {
    for (Py_ssize_t j = 0; j < layer->out; j++)
        y[j] = layer->bias[j];
    for (Py_ssize_t i = 0; i < layer->in; i++) {
        const float xi = x[i], *w = layer->weight_t + i * layer->out;
        for (Py_ssize_t j = 0; j < layer->out; j++)
            y[j] += xi * w[j];
    }
}

/* torch's layer_norm over n values: (x - mean) / sqrt(var + eps) * weight + bias, var the biased variance. */
static void layer_norm(float *x, Py_ssize_t n, const float *weight, const float *bias, double eps) {
    double mean = 0.0, var = 0.0;
    for (Py_ssize_t i = 0; i < n; i++)
        mean += x[i];
    mean /= n;
    for (Py_ssize_t i = 0; i < n; i++)
        var += (x[i] - mean) * (x[i] - mean);
    double rstd = 1.0 / sqrt(var / n + eps);
    for (Py_ssize_t i = 0; i < n; i++)
        x[i] = (float)((x[i] - mean) * rstd) * weight[i] + bias[i];
}

/* Reads norm = (weight address, bias address, eps, dim) and layers = [(weight_t address, bias address, in, out)]:
   a stack whose first input is dim wide, each next as wide as the last output, the last output one wide. */
static int parse_stack(PyObject *norm, PyObject *layers, const float **norm_w, const float **norm_b, double *eps,
                       Py_ssize_t *dim, Linear *linears, Py_ssize_t *num, Py_ssize_t *widest) {
    if (!PyTuple_Check(norm) || PyTuple_GET_SIZE(norm) != 4 || !PyList_Check(layers) || PyList_GET_SIZE(layers) < 1
        || PyList_GET_SIZE(layers) > 8) {
        PyErr_SetString(PyExc_TypeError, "mlp: norm is (weight, bias, eps, dim) and layers a list of 1 to 8 Linears");
        return -1;
    }
    *norm_w = (const float *)PyLong_AsVoidPtr(PyTuple_GET_ITEM(norm, 0));
    *norm_b = (const float *)PyLong_AsVoidPtr(PyTuple_GET_ITEM(norm, 1));
    *eps = PyFloat_AsDouble(PyTuple_GET_ITEM(norm, 2));
    *dim = PyLong_AsSsize_t(PyTuple_GET_ITEM(norm, 3));
    if (PyErr_Occurred())
        return -1;
    *num = PyList_GET_SIZE(layers);
    *widest = *dim;
    Py_ssize_t width = *dim;
    for (Py_ssize_t l = 0; l < *num; l++) {
        PyObject *spec = PyList_GET_ITEM(layers, l);
        if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 4) {
            PyErr_SetString(PyExc_TypeError, "mlp: a layer is (weight_t address, bias address, in, out)");
            return -1;
        }
        linears[l].weight_t = (const float *)PyLong_AsVoidPtr(PyTuple_GET_ITEM(spec, 0));
        linears[l].bias = (const float *)PyLong_AsVoidPtr(PyTuple_GET_ITEM(spec, 1));
        linears[l].in = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, 2));
        linears[l].out = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, 3));
        if (PyErr_Occurred())
            return -1;
        if (linears[l].weight_t == NULL || linears[l].bias == NULL || linears[l].in != width || linears[l].out < 1) {
            PyErr_SetString(PyExc_ValueError, "mlp: a null layer, or one whose input is not the width before it");
            return -1;
        }
        width = linears[l].out;
        if (width > *widest)
            *widest = width;
    }
    if (*norm_w == NULL || *norm_b == NULL || *dim < 1 || width != 1) {
        PyErr_SetString(PyExc_ValueError, "mlp: a null norm, or a stack whose last output is not one wide");
        return -1;
    }
    return 0;
}

/* mlp(rows, norm, layers): for each row (a list of dim features), LayerNorm, then
   the Linears with z + z * erf(z) between them (the GELU of FrozenRouterMLP, whose 1 / sqrt(2) factors are in the
   weights); the last Linear's one output per row, as a list. */
static PyObject *mlp(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "mlp(rows: list, norm, layers) takes 3 arguments");
        return NULL;
    }
    const float *norm_w, *norm_b;
    double eps;
    Linear linears[8];
    Py_ssize_t dim, num, widest;
    if (parse_stack(args[1], args[2], &norm_w, &norm_b, &eps, &dim, linears, &num, &widest) < 0)
        return NULL;
    Py_ssize_t rows = PyList_GET_SIZE(args[0]);
    float *a = PyMem_Malloc(2 * widest * sizeof(float)), *b = a + widest;
    PyObject *out = PyList_New(rows);
    if (a == NULL || out == NULL) {
        PyMem_Free(a);
        Py_XDECREF(out);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t r = 0; r < rows; r++) {
        if (read_row(PyList_GET_ITEM(args[0], r), a, dim) < 0)
            goto fail;
        layer_norm(a, dim, norm_w, norm_b, eps);
        float *x = a, *y = b;
        for (Py_ssize_t l = 0; l < num; l++) {
            linear(&linears[l], x, y);
            if (l < num - 1)
                for (Py_ssize_t j = 0; j < linears[l].out; j++)
                    y[j] += y[j] * erff(y[j]);
            float *t = x;
            x = y;
            y = t;
        }
        PyObject *value = PyFloat_FromDouble(x[0]);
        if (value == NULL)
            goto fail;
        PyList_SET_ITEM(out, r, value);
    }
    PyMem_Free(a);
    return out;
fail:
    PyMem_Free(a);
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"greedy", (PyCFunction)(void (*)(void))greedy, METH_FASTCALL,
     "greedy(address, rows, cols, row_stride, top1) -> (ids, row maxima, top-1 probabilities or None)"},
    {"entropy", (PyCFunction)(void (*)(void))entropy, METH_FASTCALL,
     "entropy(address, rows, cols, row_stride) -> each row's softmax entropy in nats"},
    {"top", (PyCFunction)(void (*)(void))top, METH_FASTCALL,
     "top(address, rows, cols, row_stride, k) -> (ids, values): each row's k largest, descending"},
    {"mlp", (PyCFunction)(void (*)(void))mlp, METH_FASTCALL,
     "mlp(rows, norm, layers) -> one output per row of LayerNorm, then Linears with GELU (z + z erf z) between"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hostops", "Small per-step reductions and MLPs in C.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__hostops(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "MAX_TOP", MAX_TOP) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
