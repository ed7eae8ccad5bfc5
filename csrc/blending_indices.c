/* Blending indices of a BlendedDataset (spec 2.8), compiled on first use by
   megatron_lite/data/blending_indices.py and loaded with ctypes. */
#include <stdint.h>
#include <stdlib.h>

/* spec 2.8: err_i = w_i * max(t, 1) - c_i; strict '>' scan keeps the lowest index on ties. */
void build_blending_indices(int16_t *dataset_index, int64_t *dataset_sample_index,
                            const double *weights, int32_t num_datasets, int64_t size) {
  int64_t *counts = calloc((size_t)num_datasets, sizeof(int64_t));
  for (int64_t t = 0; t < size; ++t) {
    double td = t > 1 ? (double)t : 1.0;
    int32_t best = 0;
    double best_err = weights[0] * td - (double)counts[0];
    for (int32_t i = 1; i < num_datasets; ++i) {
      double err = weights[i] * td - (double)counts[i];
      if (err > best_err) { best_err = err; best = i; }
    }
    dataset_index[t] = (int16_t)best;
    dataset_sample_index[t] = counts[best];
    counts[best] += 1;
  }
  free(counts);
}

/* Exhaustive variant: weights = sizes / total, only datasets with samples left compete. */
void build_exhaustive_blending_indices(int16_t *dataset_index, int64_t *dataset_sample_index,
                                       const int64_t *sizes, int32_t num_datasets) {
  int64_t total = 0;
  for (int32_t i = 0; i < num_datasets; ++i) total += sizes[i];
  int64_t *counts = calloc((size_t)num_datasets, sizeof(int64_t));
  for (int64_t t = 0; t < total; ++t) {
    double td = t > 1 ? (double)t : 1.0;
    int32_t best = -1;
    double best_err = 0.0;
    for (int32_t i = 0; i < num_datasets; ++i) {
      if (counts[i] >= sizes[i]) continue;
      double err = ((double)sizes[i] / (double)total) * td - (double)counts[i];
      if (best < 0 || err > best_err) { best_err = err; best = i; }
    }
    dataset_index[t] = (int16_t)best;
    dataset_sample_index[t] = counts[best];
    counts[best] += 1;
  }
  free(counts);
}
