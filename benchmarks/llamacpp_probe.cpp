// llava-ext-probe: what tests/test_llamacpp.py reads out of llama.cpp, through its C API (libllama, libmtmd).
// benchmarks/build_llamacpp.sh compiles it beside the llama.cpp tools.
//
//   llava-ext-probe logits MODEL.gguf f32|default TEXT ID...  one "LOGITS v..." line per id (the ids fed as one
//                                                          batch; attention in f32: f32 KV cache, no flash
//                                                          attention; or llama.cpp's default: f16 cache, flash
//                                                          attention), then "TOKENS id..." for TEXT as llama.cpp
//                                                          tokenizes it
//   llava-ext-probe image MODEL.gguf MMPROJ.gguf IMAGE [THREADS]  one "EMBD v..." line per image token: the
//                                                          projector's output, what the language model receives;
//                                                          then "ENCODE_MS t": the encode's wall time
#include "llama.h"
#include "mtmd.h"
#include "mtmd-helper.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static llama_model * load_model(const char * path) {
    llama_model_params params = llama_model_default_params();
    params.progress_callback = [](float, void *) { return true; };  // no progress dots
    llama_model * model = llama_model_load_from_file(path, params);
    if (!model) fprintf(stderr, "could not load %s\n", path);
    return model;
}

static int logits(const char * model_path, const char * attention, const char * text, int n_ids, char ** id_args) {
    llama_model * model = load_model(model_path);
    if (!model) return 1;
    const llama_vocab * vocab = llama_model_get_vocab(model);
    llama_context_params params = llama_context_default_params();
    params.n_ctx = params.n_batch = params.n_ubatch = 512;
    params.n_threads = params.n_threads_batch = 1;  // one summation order, run to run
    if (strcmp(attention, "f32") == 0) {  // the CPU flash-attention kernel rounds K and V to f16 whatever the cache
        params.type_k = params.type_v = GGML_TYPE_F32;
        params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    llama_context * ctx = llama_init_from_model(model, params);
    if (!ctx) { fprintf(stderr, "could not create a context\n"); return 1; }
    llama_batch batch = llama_batch_init(n_ids, 0, 1);
    for (int i = 0; i < n_ids; i++) {
        batch.token[i] = atoi(id_args[i]); batch.pos[i] = i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n_ids;
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(vocab);
    for (int i = 0; i < n_ids; i++) {
        const float * row = llama_get_logits_ith(ctx, i);
        printf("LOGITS");
        for (int j = 0; j < n_vocab; j++) printf(" %.9g", row[j]);
        printf("\n");
    }
    std::vector<llama_token> ids(strlen(text) + 8);
    const int n = llama_tokenize(vocab, text, (int) strlen(text), ids.data(), (int) ids.size(), true, true);
    printf("TOKENS");
    for (int i = 0; i < n; i++) printf(" %d", ids[i]);
    printf("\n");
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}

static int image(const char * model_path, const char * mmproj_path, const char * image_path, int n_threads) {
    llama_model * model = load_model(model_path);
    if (!model) return 1;
    mtmd_context_params params = mtmd_context_params_default();
    params.use_gpu = false; params.n_threads = n_threads; params.print_timings = false; params.warmup = false;
    mtmd_context * ctx = mtmd_init_from_file(mmproj_path, model, params);
    if (!ctx) { fprintf(stderr, "could not load %s\n", mmproj_path); return 1; }
    mtmd_helper_bitmap_wrapper bitmap = mtmd_helper_bitmap_init_from_file(ctx, image_path, false,
                                                                          mtmd_helper_init_opt_default());
    if (!bitmap.bitmap) { fprintf(stderr, "could not read %s\n", image_path); return 1; }
    mtmd_input_text prompt = {mtmd_default_marker(), strlen(mtmd_default_marker()), false, true};
    mtmd_input_chunks * chunks = mtmd_input_chunks_init();
    const mtmd_bitmap * bitmaps[] = {bitmap.bitmap};
    if (mtmd_tokenize(ctx, chunks, &prompt, bitmaps, 1) != 0) { fprintf(stderr, "mtmd_tokenize failed\n"); return 1; }
    const int n_embd = llama_model_n_embd_inp(model);
    double encode_ms = 0;
    for (size_t c = 0; c < mtmd_input_chunks_size(chunks); c++) {
        const mtmd_input_chunk * chunk = mtmd_input_chunks_get(chunks, c);
        if (mtmd_input_chunk_get_type(chunk) != MTMD_INPUT_CHUNK_TYPE_IMAGE) continue;
        const auto start = std::chrono::steady_clock::now();
        if (mtmd_encode_chunk(ctx, chunk) != 0) { fprintf(stderr, "mtmd_encode_chunk failed\n"); return 1; }
        encode_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        const float * embd = mtmd_get_output_embd(ctx);
        for (size_t t = 0; t < mtmd_input_chunk_get_n_tokens(chunk); t++) {
            printf("EMBD");
            for (int j = 0; j < n_embd; j++) printf(" %.9g", embd[t * n_embd + j]);
            printf("\n");
        }
    }
    printf("ENCODE_MS %.3f\n", encode_ms);
    mtmd_input_chunks_free(chunks);
    mtmd_bitmap_free(bitmap.bitmap);
    mtmd_free(ctx);
    llama_model_free(model);
    return 0;
}

int main(int argc, char ** argv) {
    llama_log_set(quiet, nullptr);
    mtmd_helper_log_set(quiet, nullptr);
    llama_backend_init();
    if (argc >= 5 && strcmp(argv[1], "logits") == 0) return logits(argv[2], argv[3], argv[4], argc - 5, argv + 5);
    if ((argc == 5 || argc == 6) && strcmp(argv[1], "image") == 0) {
        return image(argv[2], argv[3], argv[4], argc == 6 ? atoi(argv[5]) : 1);
    }
    fprintf(stderr, "usage: %s logits MODEL.gguf f32|default TEXT ID...\n"
                    "       %s image MODEL.gguf MMPROJ.gguf IMAGE [THREADS]\n", argv[0], argv[0]);
    return 2;
}
