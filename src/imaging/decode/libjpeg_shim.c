/* convflow: libjpeg-turbo decoding with DCT-domain scaling (the decode
 * stage's `min_size`), through the libjpeg API of the system's libjpeg-turbo
 * (Debian: libjpeg62-turbo-dev).
 *
 * libjpeg reports a fatal error by calling error_exit, which must not
 * return: it longjmps back to the setjmp in the function of this file that
 * called libjpeg, so no Rust frame is ever jumped over. Warnings (corrupt
 * data libjpeg would paper over with grey) are counted and make the call
 * fail, so the Rust side falls back to its own stricter decoder and its
 * error messages. */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

struct cf_jpeg {
    struct jpeg_decompress_struct cinfo;
    struct jpeg_error_mgr jerr;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
    int header_read;
};

static void cf_error_exit(j_common_ptr c) {
    struct cf_jpeg *h = (struct cf_jpeg *)c->client_data;
    (*c->err->format_message)(c, h->message);
    longjmp(h->jump, 1);
}

static void cf_emit_message(j_common_ptr c, int level) {
    struct cf_jpeg *h = (struct cf_jpeg *)c->client_data;
    if (level < 0) {
        if (c->err->num_warnings == 0) (*c->err->format_message)(c, h->message);
        c->err->num_warnings++;
    }
}

static void cf_output_message(j_common_ptr c) { (void)c; }

static int cf_create(struct cf_jpeg *h) {
    if (setjmp(h->jump)) return -1;
    jpeg_create_decompress(&h->cinfo);
    return 0;
}

struct cf_jpeg *cf_jpeg_new(void) {
    struct cf_jpeg *h = calloc(1, sizeof(struct cf_jpeg));
    if (!h) return NULL;
    h->cinfo.err = jpeg_std_error(&h->jerr);
    h->jerr.error_exit = cf_error_exit;
    h->jerr.emit_message = cf_emit_message;
    h->jerr.output_message = cf_output_message;
    h->cinfo.client_data = h;
    if (cf_create(h) != 0) {
        free(h);
        return NULL;
    }
    return h;
}

void cf_jpeg_free(struct cf_jpeg *h) {
    if (!h) return;
    jpeg_destroy_decompress(&h->cinfo);
    free(h);
}

const char *cf_jpeg_message(const struct cf_jpeg *h) { return h->message; }

/* Reads the header of data[0..len]: 0, or -1 (see cf_jpeg_message). exif
 * and exif_len: the first APP1 Exif payload after "Exif\0\0" (or NULL, 0),
 * valid until the next call on h. */
int cf_jpeg_header(struct cf_jpeg *h, const unsigned char *data, unsigned long len, unsigned *width,
                   unsigned *height, int *components, const unsigned char **exif, unsigned *exif_len) {
    h->message[0] = 0;
    h->header_read = 0;
    if (setjmp(h->jump)) {
        jpeg_abort_decompress(&h->cinfo);
        return -1;
    }
    jpeg_abort_decompress(&h->cinfo);
    h->jerr.num_warnings = 0;
    jpeg_mem_src(&h->cinfo, data, len);
    jpeg_save_markers(&h->cinfo, JPEG_APP0 + 1, 0xFFFF);
    jpeg_read_header(&h->cinfo, TRUE);
    *width = h->cinfo.image_width;
    *height = h->cinfo.image_height;
    *components = h->cinfo.num_components;
    *exif = NULL;
    *exif_len = 0;
    for (jpeg_saved_marker_ptr m = h->cinfo.marker_list; m; m = m->next) {
        if (m->marker == JPEG_APP0 + 1 && m->data_length > 6 && memcmp(m->data, "Exif\0\0", 6) == 0) {
            *exif = m->data + 6;
            *exif_len = m->data_length - 6;
            break;
        }
    }
    if (h->jerr.num_warnings) return -1;
    h->header_read = 1;
    return 0;
}

/* Decodes the image whose header was just read (same data, still alive),
 * scaled by scale_num/8, to packed RGB in out (cap bytes). The output is
 * ceil(width * scale_num / 8) x ceil(height * scale_num / 8): 0, or -1. */
int cf_jpeg_decode(struct cf_jpeg *h, int scale_num, unsigned char *out, unsigned long cap, unsigned *out_w,
                   unsigned *out_h) {
    if (!h->header_read) {
        snprintf(h->message, sizeof h->message, "no header read");
        return -1;
    }
    h->header_read = 0;
    if (setjmp(h->jump)) {
        jpeg_abort_decompress(&h->cinfo);
        return -1;
    }
    h->cinfo.scale_num = (unsigned)scale_num;
    h->cinfo.scale_denom = 8;
    h->cinfo.out_color_space = JCS_RGB;
    jpeg_start_decompress(&h->cinfo);
    unsigned long stride = (unsigned long)h->cinfo.output_width * 3;
    if (h->cinfo.output_components != 3 || stride * h->cinfo.output_height > cap) {
        snprintf(h->message, sizeof h->message, "unexpected output %ux%ux%d", h->cinfo.output_width,
                 h->cinfo.output_height, h->cinfo.output_components);
        jpeg_abort_decompress(&h->cinfo);
        return -1;
    }
    while (h->cinfo.output_scanline < h->cinfo.output_height) {
        JSAMPROW row = out + stride * h->cinfo.output_scanline;
        jpeg_read_scanlines(&h->cinfo, &row, 1);
    }
    *out_w = h->cinfo.output_width;
    *out_h = h->cinfo.output_height;
    jpeg_finish_decompress(&h->cinfo);
    return h->jerr.num_warnings ? -1 : 0;
}
