/*
 * run_signature: run one request against a SavedModel through TensorFlow's C API.
 *
 * It loads the model with TF_LoadSessionFromSavedModel, which wraps the same C++ SavedModel loader
 * (tensorflow::LoadSavedModel) that TF Serving links, so a model that runs here runs in the
 * loader TF Serving uses -- without Python and without tf.function tracing.
 *
 * Usage:  run_signature SAVED_MODEL_DIR < request
 *
 * The request on stdin is a list of lines (blank lines are ignored):
 *
 *     input TENSOR_NAME DTYPE DIMS VALUE...
 *     fetch TENSOR_NAME
 *
 *   TENSOR_NAME  a graph tensor "op_name:index", e.g. serving_default_tokens:0. The program does
 *                not read signature_defs (that would mean parsing protobuf in C); the caller maps
 *                a signature's logical names to tensor names.
 *   DTYPE        int32, int64, float or string.
 *   DIMS         comma-separated dimensions ("2,5"), or "-" for a scalar.
 *   VALUE...     the elements in row-major order, separated by spaces; exactly prod(DIMS) of them.
 *
 * Strings are percent-encoded so that one value is always one whitespace-free word: every byte
 * outside the printable range 0x21..0x7E, and '%' itself, is written as '%' plus two hex digits
 * (so a space is %20, a newline %0A, '%' is %25). Because an empty word cannot be seen between
 * spaces, the empty string is written as a lone "%".
 *
 * The session is run once, with all inputs fed and all fetches requested, and for each fetch (in
 * request order) one line is printed to stdout:
 *
 *     TENSOR_NAME DTYPE DIMS VALUE...
 *
 * in the same format (floats with %.9g, which round-trips a float32 exactly).
 *
 * Any error -- a malformed request, a failed load, or a failed run such as an InvalidArgument
 * raised by the graph -- prints one line "error: CODE: message" to stderr and exits with status 1,
 * so a caller can tell a clean rejection from a crash (which would end the process by a signal).
 */

#define _POSIX_C_SOURCE 200809L /* getline, strndup, strtok_r */

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensorflow/c/c_api.h"
#include "tensorflow/c/tf_tstring.h"

#define MAX_DIMS 8

/* Everything the program allocates, kept global so that every exit path can free it. */
static TF_Status *status;
static TF_Graph *graph;
static TF_SessionOptions *session_options;
static TF_Session *session;

static int n_inputs, n_fetches;
static char **input_names, **fetch_names;
static TF_Output *inputs, *fetches;
static TF_Tensor **input_values, **fetch_values;

static char *line; /* getline's buffer */

static void cleanup(void) {
  for (int i = 0; i < n_inputs; i++) {
    TF_Tensor *t = input_values[i];
    /* A string tensor made by TF_AllocateTensor does not own its elements' heap buffers (long
       strings live outside the tensor), so release each TF_TString before the tensor itself. */
    if (t != NULL && TF_TensorType(t) == TF_STRING) {
      TF_TString *s = TF_TensorData(t);
      for (int64_t j = 0; j < TF_TensorElementCount(t); j++) TF_StringDealloc(&s[j]);
    }
    if (t != NULL) TF_DeleteTensor(t);
    free(input_names[i]);
  }
  /* Tensors returned by TF_SessionRun own their data, strings included. */
  for (int i = 0; i < n_fetches; i++) {
    if (fetch_values != NULL && fetch_values[i] != NULL) TF_DeleteTensor(fetch_values[i]);
    free(fetch_names[i]);
  }
  free(input_names), free(inputs), free(input_values);
  free(fetch_names), free(fetches), free(fetch_values);
  free(line);
  if (session != NULL) {
    TF_CloseSession(session, status);
    TF_DeleteSession(session, status);
  }
  if (session_options != NULL) TF_DeleteSessionOptions(session_options);
  if (graph != NULL) TF_DeleteGraph(graph);
  if (status != NULL) TF_DeleteStatus(status);
}

/* Print "error: ..." and exit 1, freeing everything first. */
static void die(const char *format, ...) {
  va_list args;
  va_start(args, format);
  fputs("error: ", stderr);
  vfprintf(stderr, format, args);
  fputc('\n', stderr);
  va_end(args);
  cleanup();
  exit(1);
}

static const char *code_name(TF_Code code) {
  switch (code) {
    case TF_OK: return "OK";
    case TF_CANCELLED: return "CANCELLED";
    case TF_UNKNOWN: return "UNKNOWN";
    case TF_INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case TF_DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case TF_NOT_FOUND: return "NOT_FOUND";
    case TF_ALREADY_EXISTS: return "ALREADY_EXISTS";
    case TF_PERMISSION_DENIED: return "PERMISSION_DENIED";
    case TF_UNAUTHENTICATED: return "UNAUTHENTICATED";
    case TF_RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case TF_FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case TF_ABORTED: return "ABORTED";
    case TF_OUT_OF_RANGE: return "OUT_OF_RANGE";
    case TF_UNIMPLEMENTED: return "UNIMPLEMENTED";
    case TF_INTERNAL: return "INTERNAL";
    case TF_UNAVAILABLE: return "UNAVAILABLE";
    case TF_DATA_LOSS: return "DATA_LOSS";
    default: return "UNKNOWN_CODE";
  }
}

static void check_status(void) {
  if (TF_GetCode(status) != TF_OK) die("%s: %s", code_name(TF_GetCode(status)), TF_Message(status));
}

/* ---- request parsing ---------------------------------------------------------------------- */

static TF_DataType parse_dtype(const char *word) {
  if (strcmp(word, "int32") == 0) return TF_INT32;
  if (strcmp(word, "int64") == 0) return TF_INT64;
  if (strcmp(word, "float") == 0) return TF_FLOAT;
  if (strcmp(word, "string") == 0) return TF_STRING;
  die("unsupported dtype '%s' (expected int32, int64, float or string)", word);
  return TF_FLOAT; /* not reached */
}

static const char *dtype_name(TF_DataType dtype) {
  switch (dtype) {
    case TF_INT32: return "int32";
    case TF_INT64: return "int64";
    case TF_FLOAT: return "float";
    case TF_STRING: return "string";
    default: return NULL;
  }
}

/* Parse "D0,D1,..." (or "-" for a scalar) into dims; return the rank. */
static int parse_dims(const char *word, int64_t *dims) {
  if (strcmp(word, "-") == 0) return 0;
  int rank = 0;
  const char *p = word;
  for (;;) {
    char *end;
    errno = 0;
    long long d = strtoll(p, &end, 10);
    if (end == p || errno != 0 || d < 0 || rank == MAX_DIMS) die("bad dims '%s'", word);
    dims[rank++] = d;
    if (*end == '\0') return rank;
    if (*end != ',') die("bad dims '%s'", word);
    p = end + 1;
  }
}

/* Split "op_name:index" and look the operation up in the loaded graph. */
static TF_Output resolve(const char *name) {
  const char *colon = strrchr(name, ':');
  char *end;
  long index = colon == NULL ? -1 : strtol(colon + 1, &end, 10);
  if (colon == NULL || colon == name || *end != '\0' || index < 0)
    die("tensor name '%s' is not of the form op_name:index", name);
  char *op_name = strndup(name, (size_t)(colon - name));
  TF_Operation *op = TF_GraphOperationByName(graph, op_name);
  free(op_name);
  if (op == NULL) die("NOT_FOUND: no operation for tensor '%s' in the graph", name);
  if (index >= TF_OperationNumOutputs(op)) die("NOT_FOUND: operation of '%s' has no such output", name);
  return (TF_Output){op, (int)index};
}

static int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Decode a percent-encoded word in place; return the decoded length. */
static size_t percent_decode(char *word) {
  if (strcmp(word, "%") == 0) return 0; /* the empty string */
  size_t n = 0;
  for (char *p = word; *p != '\0'; p++) {
    if (*p == '%') {
      int hi = hex_value(p[1]), lo = hi < 0 ? -1 : hex_value(p[2]);
      if (hi < 0 || lo < 0) die("bad percent escape in '%s'", word);
      word[n++] = (char)(hi * 16 + lo);
      p += 2;
    } else {
      word[n++] = *p;
    }
  }
  return n;
}

/* Build a tensor from the value words that follow DIMS on an input line (consumed via strtok_r). */
static TF_Tensor *parse_values(const char *name, TF_DataType dtype, const int64_t *dims, int rank, char **save) {
  int64_t count = 1;
  for (int i = 0; i < rank; i++) count *= dims[i];
  size_t element_size = dtype == TF_STRING ? sizeof(TF_TString) : TF_DataTypeSize(dtype);
  TF_Tensor *tensor = TF_AllocateTensor(dtype, dims, rank, (size_t)count * element_size);
  void *data = TF_TensorData(tensor);
  /* Register the tensor at once so that die() below frees it; its strings start out empty. */
  input_values[n_inputs - 1] = tensor;
  if (dtype == TF_STRING)
    for (int64_t i = 0; i < count; i++) TF_StringInit(&((TF_TString *)data)[i]);

  int64_t i = 0;
  for (char *word; (word = strtok_r(NULL, " \t\r\n", save)) != NULL; i++) {
    if (i == count) die("input '%s': more than %lld values", name, (long long)count);
    char *end = word;
    errno = 0;
    switch (dtype) {
      case TF_INT32: {
        long v = strtol(word, &end, 10);
        if (v < INT32_MIN || v > INT32_MAX) errno = ERANGE;
        ((int32_t *)data)[i] = (int32_t)v;
        break;
      }
      case TF_INT64: ((int64_t *)data)[i] = strtoll(word, &end, 10); break;
      case TF_FLOAT: {
        float v = strtof(word, &end);
        if (v > -1 && v < 1) errno = 0; /* underflow to a subnormal or zero is a fine value; overflow is not */
        ((float *)data)[i] = v;
        break;
      }
      default: { /* TF_STRING */
        size_t n = percent_decode(word);
        TF_StringCopy(&((TF_TString *)data)[i], word, n);
        end = word + strlen(word); /* decoding always consumes the whole word */
        break;
      }
    }
    if (*end != '\0' || errno == ERANGE) die("input '%s': bad %s value '%s'", name, dtype_name(dtype), word);
  }
  if (i != count) die("input '%s': got %lld values, dims need %lld", name, (long long)i, (long long)count);
  return tensor;
}

/* Read the whole request. Inputs are resolved against the graph, so it must be loaded first. */
static void read_request(void) {
  size_t capacity = 0;
  while (getline(&line, &capacity, stdin) != -1) {
    char *save;
    char *kind = strtok_r(line, " \t\r\n", &save);
    if (kind == NULL) continue; /* blank line */
    char *name = strtok_r(NULL, " \t\r\n", &save);
    if (name == NULL) die("'%s' line without a tensor name", kind);

    if (strcmp(kind, "fetch") == 0) {
      fetch_names = realloc(fetch_names, (n_fetches + 1) * sizeof *fetch_names);
      fetches = realloc(fetches, (n_fetches + 1) * sizeof *fetches);
      fetch_names[n_fetches++] = strdup(name);
      fetches[n_fetches - 1] = resolve(name);
    } else if (strcmp(kind, "input") == 0) {
      char *dtype_word = strtok_r(NULL, " \t\r\n", &save);
      char *dims_word = dtype_word == NULL ? NULL : strtok_r(NULL, " \t\r\n", &save);
      if (dims_word == NULL) die("input '%s': expected DTYPE DIMS after the name", name);
      input_names = realloc(input_names, (n_inputs + 1) * sizeof *input_names);
      inputs = realloc(inputs, (n_inputs + 1) * sizeof *inputs);
      input_values = realloc(input_values, (n_inputs + 1) * sizeof *input_values);
      input_names[n_inputs] = strdup(name);
      input_values[n_inputs++] = NULL;
      inputs[n_inputs - 1] = resolve(name);
      TF_DataType dtype = parse_dtype(dtype_word);
      int64_t dims[MAX_DIMS];
      int rank = parse_dims(dims_word, dims);
      parse_values(name, dtype, dims, rank, &save);
    } else {
      die("unknown request line '%s' (expected 'input' or 'fetch')", kind);
    }
  }
  if (n_fetches == 0) die("nothing to fetch");
}

/* ---- output --------------------------------------------------------------------------------- */

static void print_string(const char *s, size_t n) {
  if (n == 0) {
    fputs("%", stdout);
    return;
  }
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c >= 0x21 && c <= 0x7E && c != '%')
      putchar(c);
    else
      printf("%%%02X", c);
  }
}

static void print_tensor(const char *name, const TF_Tensor *t) {
  TF_DataType dtype = TF_TensorType(t);
  if (dtype_name(dtype) == NULL) die("fetch '%s': unsupported dtype %d", name, (int)dtype);
  printf("%s %s ", name, dtype_name(dtype));
  if (TF_NumDims(t) == 0) putchar('-');
  for (int d = 0; d < TF_NumDims(t); d++) printf(d == 0 ? "%lld" : ",%lld", (long long)TF_Dim(t, d));

  const void *data = TF_TensorData(t);
  for (int64_t i = 0; i < TF_TensorElementCount(t); i++) {
    putchar(' ');
    switch (dtype) {
      case TF_INT32: printf("%d", ((const int32_t *)data)[i]); break;
      case TF_INT64: printf("%lld", (long long)((const int64_t *)data)[i]); break;
      case TF_FLOAT: printf("%.9g", ((const float *)data)[i]); break;
      default: {
        const TF_TString *s = &((const TF_TString *)data)[i];
        print_string(TF_StringGetDataPointer(s), TF_StringGetSize(s));
        break;
      }
    }
  }
  putchar('\n');
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s SAVED_MODEL_DIR < request\n", argv[0]);
    return 2;
  }
  status = TF_NewStatus();
  graph = TF_NewGraph();
  session_options = TF_NewSessionOptions();

  /* The loader restores the variables and runs the SavedModel's init op (e.g. the vocabulary
     hash tables' initializers), exactly as TF Serving's loader does. */
  const char *tags[] = {"serve"};
  session = TF_LoadSessionFromSavedModel(session_options, NULL, argv[1], tags, 1, graph, NULL, status);
  check_status();

  read_request();

  fetch_values = calloc((size_t)n_fetches, sizeof *fetch_values);
  TF_SessionRun(session, NULL, inputs, input_values, n_inputs, fetches, fetch_values, n_fetches, NULL, 0, NULL,
                status);
  check_status();

  for (int i = 0; i < n_fetches; i++) print_tensor(fetch_names[i], fetch_values[i]);
  cleanup();
  return 0;
}
