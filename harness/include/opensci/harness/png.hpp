// A small PNG writer for the cells' per-layer plots (CTest image measurements must be PNG or
// JPEG; CDash shows them beside the test). 8-bit palette images, one zlib stream compressed with
// deflate's fixed Huffman codes and two match candidates (the previous byte: runs; the byte one
// row above: repeated rows), which is what bar charts are made of. No dependency beyond the
// standard library: CRC-32 and Adler-32 are computed here.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace opensci::harness::png {

// CRC-32 of PNG chunks and gzip (reflected polynomial 0xEDB88320); pass the previous value to continue.
uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc = 0);
// Adler-32 of zlib streams; pass the previous value to continue (start: 1).
uint32_t adler32(const uint8_t* data, size_t size, uint32_t adler = 1);

// A zlib stream (RFC 1950) holding one fixed-Huffman deflate block (RFC 1951). `row_stride` > 0
// also tries matches one row back (distance = row_stride).
std::vector<uint8_t> zlib_compress(const std::vector<uint8_t>& data, size_t row_stride = 0);

using Rgb = std::array<uint8_t, 3>;

// An 8-bit palette image: pixels are indices into `palette` (at most 256 entries).
struct IndexedImage {
  int width = 0, height = 0;
  std::vector<Rgb> palette;
  std::vector<uint8_t> pixels;  // [height][width]

  IndexedImage(int w, int h, std::vector<Rgb> colours, uint8_t background = 0);
  void set(int x, int y, uint8_t colour);  // clipped to the image
  void fill_rect(int x, int y, int w, int h, uint8_t colour);
  // ASCII text in a 5x7 pixel font, 6 pixels per character, top-left at (x, y). Upper case is
  // drawn as lower case; characters without a glyph as '?'. Returns the x after the text.
  int text(int x, int y, std::string_view s, uint8_t colour);
};
inline constexpr int kGlyphAdvance = 6, kGlyphHeight = 7;

// The PNG file bytes: signature, IHDR (colour type 3), PLTE, one IDAT, IEND.
std::vector<uint8_t> encode_png(const IndexedImage& image);

}  // namespace opensci::harness::png
