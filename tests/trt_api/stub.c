/* Stand-ins for libnvinfer, libnvonnxparser and libnvinfer_plugin (.so.10 and .so.11), so that the real TensorRT
 * Python bindings import without a GPU: every symbol the bindings import (nm -D --undefined-only tensorrt.so), each
 * returning NULL or 0, as TensorRT's factories do where no usable GPU is found. */
#include <stddef.h>

void *createInferBuilder_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return NULL; }
void *getPluginRegistry(void) { return NULL; }
void *getBuilderPluginRegistry(int capability) { return NULL; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
int initLibNvInferPlugins(void *logger, const char *ns) { return 0; }
