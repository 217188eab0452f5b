#include "opensci/harness/png.hpp"

#include <algorithm>
#include <cctype>
#include <map>
#include <string>

#include "opensci/error.hpp"

namespace opensci::harness::png {
namespace {

// ------------------------------------------------------------------------------------------
// Checksums
// ------------------------------------------------------------------------------------------
std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t n = 0; n < 256; ++n) {
    uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    t[n] = c;
  }
  return t;
}

// ------------------------------------------------------------------------------------------
// Deflate, fixed Huffman codes (RFC 1951 3.2.6). Bits go out LSB first; Huffman codes are
// defined MSB first, so they are bit-reversed before writing.
// ------------------------------------------------------------------------------------------
class BitWriter {
 public:
  explicit BitWriter(std::vector<uint8_t>& out) : out_(out) {}
  void bits(uint32_t value, int count) {  // `count` low bits of value, LSB first
    for (int i = 0; i < count; ++i) {
      acc_ |= ((value >> i) & 1u) << n_;
      if (++n_ == 8) flush_byte();
    }
  }
  void huffman(uint32_t code, int length) {  // MSB-first code
    uint32_t reversed = 0;
    for (int i = 0; i < length; ++i) reversed |= ((code >> i) & 1u) << (length - 1 - i);
    bits(reversed, length);
  }
  void finish() {
    if (n_ > 0) flush_byte();
  }

 private:
  void flush_byte() {
    out_.push_back(static_cast<uint8_t>(acc_));
    acc_ = 0;
    n_ = 0;
  }
  std::vector<uint8_t>& out_;
  uint32_t acc_ = 0;
  int n_ = 0;
};

void literal_length_symbol(BitWriter& w, int sym) {
  if (sym <= 143)
    w.huffman(0x30u + static_cast<uint32_t>(sym), 8);
  else if (sym <= 255)
    w.huffman(0x190u + static_cast<uint32_t>(sym - 144), 9);
  else if (sym <= 279)
    w.huffman(static_cast<uint32_t>(sym - 256), 7);
  else
    w.huffman(0xC0u + static_cast<uint32_t>(sym - 280), 8);
}

constexpr int kLengthBase[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
constexpr int kLengthExtra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                  2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
constexpr int kDistBase[30] = {1,   2,   3,   4,   5,   7,    9,    13,   17,   25,   33,   49,   65,    97,    129,
                               193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
constexpr int kDistExtra[30] = {0, 0, 0, 0, 1, 1, 2, 2,  3,  3,  4,  4,  5,  5,  6,
                                6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

void match(BitWriter& w, int length, int distance) {
  int li = 28;
  while (kLengthBase[li] > length) --li;
  literal_length_symbol(w, 257 + li);
  w.bits(static_cast<uint32_t>(length - kLengthBase[li]), kLengthExtra[li]);
  int di = 29;
  while (kDistBase[di] > distance) --di;
  w.huffman(static_cast<uint32_t>(di), 5);
  w.bits(static_cast<uint32_t>(distance - kDistBase[di]), kDistExtra[di]);
}

// ------------------------------------------------------------------------------------------
// 5x7 font: '#' = ink. Lower case, digits and the punctuation of cell and layer names.
// ------------------------------------------------------------------------------------------
const std::map<char, std::array<const char*, 7>>& font() {
  static const std::map<char, std::array<const char*, 7>> f = {
      {' ', {".....", ".....", ".....", ".....", ".....", ".....", "....."}},
      {'0', {".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."}},
      {'1', {"..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."}},
      {'2', {".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"}},
      {'3', {"#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."}},
      {'4', {"...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."}},
      {'5', {"#####", "#....", "####.", "....#", "....#", "#...#", ".###."}},
      {'6', {"..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."}},
      {'7', {"#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."}},
      {'8', {".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."}},
      {'9', {".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."}},
      {'a', {".....", ".....", ".###.", "....#", ".####", "#...#", ".####"}},
      {'b', {"#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####."}},
      {'c', {".....", ".....", ".###.", "#....", "#....", "#...#", ".###."}},
      {'d', {"....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####"}},
      {'e', {".....", ".....", ".###.", "#...#", "#####", "#....", ".###."}},
      {'f', {"..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."}},
      {'g', {".....", ".####", "#...#", "#...#", ".####", "....#", ".###."}},
      {'h', {"#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"}},
      {'i', {"..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."}},
      {'j', {"...#.", ".....", "..##.", "...#.", "...#.", "#..#.", ".##.."}},
      {'k', {"#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."}},
      {'l', {".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."}},
      {'m', {".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#"}},
      {'n', {".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"}},
      {'o', {".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."}},
      {'p', {".....", ".....", "####.", "#...#", "####.", "#....", "#...."}},
      {'q', {".....", ".....", ".##.#", "#..##", ".####", "....#", "....#"}},
      {'r', {".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."}},
      {'s', {".....", ".....", ".###.", "#....", ".###.", "....#", "####."}},
      {'t', {".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."}},
      {'u', {".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#"}},
      {'v', {".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."}},
      {'w', {".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#."}},
      {'x', {".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"}},
      {'y', {".....", ".....", "#...#", "#...#", ".####", "....#", ".###."}},
      {'z', {".....", ".....", "#####", "...#.", "..#..", ".#...", "#####"}},
      {'.', {".....", ".....", ".....", ".....", ".....", ".##..", ".##.."}},
      {',', {".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."}},
      {'-', {".....", ".....", ".....", "#####", ".....", ".....", "....."}},
      {'_', {".....", ".....", ".....", ".....", ".....", ".....", "#####"}},
      {'+', {".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."}},
      {'/', {"....#", "....#", "...#.", "..#..", ".#...", "#....", "#...."}},
      {':', {".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."}},
      {';', {".....", ".##..", ".##..", ".....", ".##..", "..#..", ".#..."}},
      {'(', {"...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."}},
      {')', {".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."}},
      {'[', {".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###."}},
      {']', {".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###."}},
      {'|', {"..#..", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."}},
      {'=', {".....", ".....", "#####", ".....", "#####", ".....", "....."}},
      {'<', {"...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#."}},
      {'>', {".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#..."}},
      {'?', {".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."}},
      {'!', {"..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#.."}},
      {'%', {"##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"}},
      {'*', {".....", "..#..", "#.#.#", ".###.", "#.#.#", "..#..", "....."}},
      {'#', {".#.#.", ".#.#.", "#####", ".#.#.", "#####", ".#.#.", ".#.#."}},
      {'\'', {"..#..", "..#..", ".#...", ".....", ".....", ".....", "....."}},
  };
  return f;
}

void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
}

void chunk(std::vector<uint8_t>& out, const char type[5], const std::vector<uint8_t>& data) {
  put_u32(out, static_cast<uint32_t>(data.size()));
  const size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  put_u32(out, crc32(out.data() + start, out.size() - start));
}

}  // namespace

uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc) {
  static const auto table = make_crc_table();
  uint32_t c = crc ^ 0xFFFFFFFFu;
  for (size_t i = 0; i < size; ++i) c = table[(c ^ data[i]) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t adler32(const uint8_t* data, size_t size, uint32_t adler) {
  constexpr uint32_t kMod = 65521;
  uint32_t a = adler & 0xFFFFu, b = adler >> 16;
  for (size_t i = 0; i < size; ++i) {
    a = (a + data[i]) % kMod;
    b = (b + a) % kMod;
  }
  return (b << 16) | a;
}

std::vector<uint8_t> zlib_compress(const std::vector<uint8_t>& data, size_t row_stride) {
  std::vector<uint8_t> out{0x78, 0x01};  // deflate, 32 KiB window; (0x7801 % 31) == 0
  BitWriter w(out);
  w.bits(1, 1);  // BFINAL: the only block
  w.bits(1, 2);  // BTYPE 01: fixed Huffman codes
  const size_t n = data.size();
  constexpr size_t kMaxMatch = 258, kWindow = 32768;
  size_t i = 0;
  while (i < n) {
    size_t best_len = 0, best_dist = 0;
    for (size_t dist : {size_t{1}, row_stride}) {
      if (dist == 0 || dist > i || dist > kWindow) continue;
      size_t len = 0;
      while (len < kMaxMatch && i + len < n && data[i + len] == data[i + len - dist]) ++len;
      if (len > best_len) best_len = len, best_dist = dist;
    }
    if (best_len >= 3) {
      match(w, static_cast<int>(best_len), static_cast<int>(best_dist));
      i += best_len;
    } else {
      literal_length_symbol(w, data[i]);
      ++i;
    }
  }
  literal_length_symbol(w, 256);  // end of block
  w.finish();
  put_u32(out, adler32(data.data(), data.size()));
  return out;
}

IndexedImage::IndexedImage(int w, int h, std::vector<Rgb> colours, uint8_t background)
    : width(w), height(h), palette(std::move(colours)) {
  if (w <= 0 || h <= 0) fail("png: image size {}x{} must be positive", w, h);
  if (palette.empty() || palette.size() > 256) fail("png: palette has {} colours, expected 1..256", palette.size());
  if (background >= palette.size())
    fail("png: background colour {} is not in the {}-colour palette", background, palette.size());
  pixels.assign(static_cast<size_t>(w) * static_cast<size_t>(h), background);
}

void IndexedImage::set(int x, int y, uint8_t colour) {
  if (x < 0 || y < 0 || x >= width || y >= height) return;
  pixels[static_cast<size_t>(y) * static_cast<size_t>(width) + static_cast<size_t>(x)] = colour;
}

void IndexedImage::fill_rect(int x, int y, int w, int h, uint8_t colour) {
  for (int yy = std::max(0, y); yy < std::min(height, y + h); ++yy)
    for (int xx = std::max(0, x); xx < std::min(width, x + w); ++xx) set(xx, yy, colour);
}

int IndexedImage::text(int x, int y, std::string_view s, uint8_t colour) {
  const auto& f = font();
  for (char ch : s) {
    auto it = f.find(static_cast<char>(std::tolower(static_cast<unsigned char>(ch))));
    if (it == f.end()) it = f.find('?');
    for (int row = 0; row < kGlyphHeight; ++row)
      for (int col = 0; col < 5; ++col)
        if (it->second[static_cast<size_t>(row)][col] == '#') set(x + col, y + row, colour);
    x += kGlyphAdvance;
  }
  return x;
}

std::vector<uint8_t> encode_png(const IndexedImage& image) {
  for (uint8_t p : image.pixels)
    if (p >= image.palette.size())
      fail("png: pixel colour {} is not in the {}-colour palette", p, image.palette.size());
  std::vector<uint8_t> out{0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<uint8_t> ihdr;
  put_u32(ihdr, static_cast<uint32_t>(image.width));
  put_u32(ihdr, static_cast<uint32_t>(image.height));
  ihdr.insert(ihdr.end(), {8, 3, 0, 0, 0});  // 8-bit, palette, deflate, adaptive filtering, no interlace
  chunk(out, "IHDR", ihdr);
  std::vector<uint8_t> plte;
  for (const auto& c : image.palette) plte.insert(plte.end(), c.begin(), c.end());
  chunk(out, "PLTE", plte);
  const size_t w = static_cast<size_t>(image.width);
  std::vector<uint8_t> raw;
  raw.reserve((w + 1) * static_cast<size_t>(image.height));
  for (int y = 0; y < image.height; ++y) {
    raw.push_back(0);  // filter: none
    const auto* row = image.pixels.data() + static_cast<size_t>(y) * w;
    raw.insert(raw.end(), row, row + w);
  }
  chunk(out, "IDAT", zlib_compress(raw, w + 1));
  chunk(out, "IEND", {});
  return out;
}

}  // namespace opensci::harness::png
